"""Multi-head latent attention (DeepSeek V2 / V3) of one DP group.

Each token caches one latent row: the normalised c_kv (kv_lora_rank values) and the rotated
shared key part (qk_rope_head_dim values). The row has no head axis, so inside an attention-TP
group it is replicated (every rank computes and caches the same rows) while the query heads, the
key/value up-projection `kv_b_proj` and `o_proj` are split over the group's ranks.

Two ways to attend, equal in exact arithmetic:
- absorbed: kv_b_proj splits into a key-up part w_kc [H, nope, R], folded into the query
  (q_nope @ w_kc: the query in latent space), and a value-up part w_vc [H, R, v], applied after
  attention; attention is then multi-query over the cached latent rows (one KV head of width
  R + rope, values its first R columns). Decode always attends this way.
- decompressed: the cached latent rows are expanded to per-head K and V through kv_b_proj and
  attended as ordinary multi-head attention (cheaper for long prefills: heads of width
  nope + rope instead of R + rope).
"""

from __future__ import annotations

import torch
from torch import nn

from dpattn.distributed.parallel_state import ParallelState
from dpattn.layers.forward_context import get_forward_context
from dpattn.layers.linear import linear, pack_params
from dpattn.layers.norm import RMSNorm
from dpattn.layers.rotary import Rotary
from dpattn.layers.weights import param, shard

# How prefill attends: "auto" decompresses a forward that has no decode rows, absorbs otherwise.
MLA_MODES = ("auto", "absorbed", "decompressed")


class MLAAttention(nn.Module):
    # What the KV pool needs: one "head" holding the latent row, no V buffers.
    num_kv_heads = 1
    cache_v_dim = 0
    sliding_window = None

    def __init__(
        self,
        ps: ParallelState,
        cache_layer: int,
        hidden_size: int,
        num_heads: int,
        q_lora_rank: int | None,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        rotary: Rotary,
        scaling: float,
        eps: float,
        dtype: torch.dtype,
        mode: str = "auto",
    ) -> None:
        super().__init__()
        a, rank = ps.attn_tp_size, ps.attn_tp_rank
        if num_heads % a:
            raise ValueError(f"{num_heads} attention heads cannot be split over attn_tp {a}")
        if mode not in MLA_MODES:
            raise ValueError(f"unknown MLA mode {mode!r}; expected one of {MLA_MODES}")
        # this layer's index in the KV pool (its stage's layers only: see Attention)
        self.cache_layer, self.mode = cache_layer, mode
        self.num_heads = h = num_heads // a
        self.kv_lora_rank, self.nope, self.rope, self.v_dim = (
            kv_lora_rank,
            qk_nope_head_dim,
            qk_rope_head_dim,
            v_head_dim,
        )
        self.head_dim = kv_lora_rank + qk_rope_head_dim  # the cached latent row's width
        self.scaling = scaling
        self.rotary = rotary
        qk = qk_nope_head_dim + qk_rope_head_dim

        def heads(full: torch.Tensor) -> torch.Tensor:
            return shard(full, 0, rank, a)

        self.q_lora_rank = q_lora_rank
        if q_lora_rank:
            self.q_a_proj = param((q_lora_rank, hidden_size), dtype)  # replicated
            self.q_a_layernorm = RMSNorm(q_lora_rank, eps, dtype)
            self.q_b_proj = param((h * qk, q_lora_rank), dtype, heads)
        else:
            self.q_proj = param((h * qk, hidden_size), dtype, heads)
        self.kv_a_proj_with_mqa = param((self.head_dim, hidden_size), dtype)  # replicated
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, eps, dtype)
        self.kv_b_proj = param((h * (qk_nope_head_dim + v_head_dim), kv_lora_rank), dtype, heads)
        self.o_proj = param((hidden_size, h * v_head_dim), dtype, lambda f: shard(f, 1, rank, a))
        self.w_kc: torch.Tensor | None = None  # [h, nope, R], from kv_b_proj at load
        self.w_vc: torch.Tensor | None = None  # [h, R, v]

    def post_load(self) -> None:
        """Weight absorption: split kv_b_proj into its key-up and value-up parts, per head."""
        kv_b = self.kv_b_proj.detach().view(self.num_heads, self.nope + self.v_dim, -1)
        self.w_kc = kv_b[:, : self.nope].contiguous()
        self.w_vc = kv_b[:, self.nope :].transpose(1, 2).contiguous()

    def prepack(self) -> None:
        names = ("q_a_proj", "q_b_proj") if self.q_lora_rank else ("q_proj",)
        pack_params(self, *names, "kv_a_proj_with_mqa", "o_proj")
        # the absorbed path reads kv_b_proj's plain per-head split: both forms stay one weight
        pack_params(self, "kv_b_proj", quantize=False)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if self.q_lora_rank:
            q = linear(self.q_a_layernorm(linear(x, self.q_a_proj)), self.q_b_proj)
        else:
            q = linear(x, self.q_proj)
        q = q.view(n, self.num_heads, self.nope + self.rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        c_kv, k_pe = linear(x, self.kv_a_proj_with_mqa).split([self.kv_lora_rank, self.rope], -1)
        q_pe, k_pe = self.rotary(positions, q_pe, k_pe.view(n, 1, self.rope))
        latent = torch.cat([self.kv_a_layernorm(c_kv).view(n, 1, self.kv_lora_rank), k_pe], -1)
        backend = get_forward_context().attn_backend
        if self.mode == "absorbed" or self.mode == "auto" and backend.has_decode():
            assert self.w_kc is not None and self.w_vc is not None, "post_load() not run"
            q_latent = torch.bmm(q_nope.transpose(0, 1), self.w_kc).transpose(0, 1)
            q = torch.cat([q_latent, q_pe], dim=-1)
            o = backend.forward_latent(q, latent, self.cache_layer, self.scaling, self.kv_lora_rank)
            o = torch.bmm(o.transpose(0, 1), self.w_vc).transpose(0, 1)
        else:
            q = torch.cat([q_nope, q_pe], dim=-1)
            o = backend.forward_latent(
                q, latent, self.cache_layer, self.scaling, self.v_dim, self._expand
            )
        return linear(o.reshape(n, self.num_heads * self.v_dim), self.o_proj)  # partial sum

    def _expand(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent rows [m, 1, R + rope] -> per-head k [m, h, nope + rope], v [m, h, v]."""
        m = rows.shape[0]
        c_kv, k_pe = rows[:, 0].split([self.kv_lora_rank, self.rope], dim=-1)
        kv = linear(c_kv, self.kv_b_proj).view(m, self.num_heads, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, None, :].expand(m, self.num_heads, self.rope)], dim=-1)
        return k, v
