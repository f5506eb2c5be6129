"""Attention of one DP group: heads split over attn_tp, paged KV, o_proj left as a partial sum."""

from __future__ import annotations

import torch
from torch import nn

from dpattn.distributed.parallel_state import ParallelState
from dpattn.layers.forward_context import get_forward_context
from dpattn.layers.linear import linear, pack_params, pack_weight
from dpattn.layers.norm import RMSNorm
from dpattn.layers.quant import Int4Weight
from dpattn.layers.rotary import Rotary
from dpattn.layers.weights import param, shard


class Attention(nn.Module):
    def __init__(
        self,
        ps: ParallelState,
        cache_layer: int,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rotary: Rotary,
        dtype: torch.dtype,
        qk_norm_eps: float | None = None,
        norm_offset: float = 0.0,
        bias: bool = False,
        scaling: float | None = None,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        a, rank = ps.attn_tp_size, ps.attn_tp_rank
        if num_heads % a:
            raise ValueError(f"{num_heads} attention heads cannot be split over attn_tp {a}")
        if num_kv_heads >= a and num_kv_heads % a or num_kv_heads < a and a % num_kv_heads:
            raise ValueError(f"{num_kv_heads} KV heads do not fit attn_tp {a}")
        # The index of this layer's buffers in the rank's KV pool, which holds only its pipeline
        # stage's layers (global layer index - stage start; the layer index without stages).
        self.cache_layer = cache_layer
        self.head_dim = head_dim
        self.cache_v_dim = head_dim  # the KV pool's V width (an MLA layer caches no V)
        self.num_heads = num_heads // a
        self.num_kv_heads = max(1, num_kv_heads // a)
        # Fewer KV heads than ranks: each rank keeps (a copy of) the KV head its Q heads use.
        kv_parts, kv_index = (
            (a, rank) if num_kv_heads >= a else (num_kv_heads, rank * num_kv_heads // a)
        )
        self.scaling = scaling if scaling is not None else head_dim**-0.5
        self.sliding_window = sliding_window
        self.rotary = rotary

        def rows(parts: int, index: int) -> object:
            return lambda full: shard(full, 0, index, parts)

        q_rows, kv_rows = self.num_heads * head_dim, self.num_kv_heads * head_dim
        self.q_proj = param((q_rows, hidden_size), dtype, rows(a, rank))
        self.k_proj = param((kv_rows, hidden_size), dtype, rows(kv_parts, kv_index))
        self.v_proj = param((kv_rows, hidden_size), dtype, rows(kv_parts, kv_index))
        self.o_proj = param((hidden_size, q_rows), dtype, lambda full: shard(full, 1, rank, a))
        self.bias = bias
        if bias:
            self.q_bias = param((q_rows,), dtype, rows(a, rank))
            self.k_bias = param((kv_rows,), dtype, rows(kv_parts, kv_index))
            self.v_bias = param((kv_rows,), dtype, rows(kv_parts, kv_index))
        # q, k, v in one packed weight (prepack)
        self.qkv_proj: torch.Tensor | Int4Weight | None = None
        self.qkv_bias: torch.Tensor | None = None
        self.q_norm = RMSNorm(head_dim, qk_norm_eps, dtype, norm_offset) if qk_norm_eps else None
        self.k_norm = RMSNorm(head_dim, qk_norm_eps, dtype, norm_offset) if qk_norm_eps else None

    def prepack(self) -> None:
        """One GEMM for q, k and v (a decode step's projections are small: fewer calls)."""
        names = ("q_proj", "k_proj", "v_proj")
        self.qkv_proj = pack_weight(*[self._parameters.pop(n) for n in names])
        if self.bias:
            biases = ("q_bias", "k_bias", "v_bias")
            self.qkv_bias = torch.cat([self._parameters.pop(n) for n in biases])
        pack_params(self, "o_proj")

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        h, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if self.qkv_proj is not None:
            q, k, v = linear(x, self.qkv_proj, self.qkv_bias).split([h, kv, kv], dim=-1)
        else:
            q = linear(x, self.q_proj, self.q_bias if self.bias else None)
            k = linear(x, self.k_proj, self.k_bias if self.bias else None)
            v = linear(x, self.v_proj, self.v_bias if self.bias else None)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        out = get_forward_context().attn_backend.forward(
            q, k, v, self.cache_layer, self.scaling, self.sliding_window
        )
        return linear(
            out.reshape(n, self.num_heads * self.head_dim), self.o_proj
        )  # partial sum over attn_tp
