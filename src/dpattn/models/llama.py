"""The Llama family (Llama, Qwen3, Qwen3-MoE, Mixtral): a pre-norm decoder sharded for DP attention.

Per layer: attention on the group's local rows -> DP gather -> MLP/MoE on all groups' rows,
tensor- or expert-parallel over world -> DP scatter back to local rows. Dense layers in the
scattered layout (moe_dense_tp_size=1) stay inside attn_tp instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dpattn.distributed.parallel_state import ParallelState
from dpattn.layers.attention import Attention
from dpattn.layers.dp_attention import attn_tp_gather, attn_tp_scatter, dp_gather, dp_scatter
from dpattn.layers.forward_context import get_forward_context
from dpattn.layers.mlp import DenseMLP
from dpattn.layers.moe import MoE, Routing
from dpattn.layers.norm import RMSNorm
from dpattn.layers.rotary import Rotary, rope_inv_freq
from dpattn.models.stage import StageLayerList, StageLayers, init_stage_ends

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
}


@dataclass(frozen=True)
class ModelOptions:
    dtype: torch.dtype = torch.float32
    ep: bool = False  # expert parallelism: whole experts per rank (ep_size == tp_size)
    moe_dense_tp_size: int | None = None  # 1 = scattered layout for dense MLP layers
    mla_mode: str = "auto"  # MLA models: how prefill attends (layers/mla.py)


def num_experts(cfg: Any) -> int:
    return int(getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", 0) or 0)


def is_moe_layer(cfg: Any, arch: str, layer_id: int) -> bool:
    if arch == "mixtral":
        return True
    if arch != "qwen3_moe" or num_experts(cfg) == 0:
        return False
    step = getattr(cfg, "decoder_sparse_step", 1) or 1
    return (
        layer_id not in (getattr(cfg, "mlp_only_layers", None) or []) and (layer_id + 1) % step == 0
    )


class DecoderLayer(nn.Module):
    def __init__(
        self,
        cfg: Any,
        arch: str,
        ps: ParallelState,
        layer_id: int,
        opts: ModelOptions,
        rotary: Rotary,
        cache_layer: int,
    ) -> None:
        super().__init__()
        self.ps = ps
        h, eps, dt = cfg.hidden_size, cfg.rms_norm_eps, opts.dtype
        head_dim = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
        self.input_layernorm = RMSNorm(h, eps, dt)
        self.post_attention_layernorm = RMSNorm(h, eps, dt)
        self.self_attn = Attention(
            ps,
            cache_layer,
            h,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            head_dim,
            rotary,
            dt,
            qk_norm_eps=eps if arch in ("qwen3", "qwen3_moe") else None,
            bias=bool(getattr(cfg, "attention_bias", False)),
        )
        act = cfg.hidden_act
        self.moe = is_moe_layer(cfg, arch, layer_id)
        self.scattered = not self.moe and opts.moe_dense_tp_size == 1
        if self.moe:
            inter = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
            norm_topk = True if arch == "mixtral" else bool(getattr(cfg, "norm_topk_prob", False))
            self.mlp: nn.Module = MoE(
                ps,
                h,
                inter,
                num_experts(cfg),
                Routing(cfg.num_experts_per_tok, norm_topk),
                act,
                dt,
                opts.ep,
            )
        else:
            self.mlp = DenseMLP(ps, h, cfg.intermediate_size, act, dt, self.scattered)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        plan = get_forward_context().plan
        attn = self.self_attn(positions, self.input_layernorm(x))
        if self.scattered:
            chunk = attn_tp_scatter(self.ps, plan, attn, x)
            return attn_tp_gather(
                self.ps, plan, chunk + self.mlp(self.post_attention_layernorm(chunk))
            )
        hidden = dp_gather(self.ps, plan, attn, x)
        return dp_scatter(self.ps, plan, self.mlp(self.post_attention_layernorm(hidden)), hidden)


class DecoderModel(nn.Module):
    """The decoder layers of `stage` (default: all, with both ends; see models/stage.py)."""

    def __init__(
        self, cfg: Any, ps: ParallelState, opts: ModelOptions, stage: StageLayers | None = None
    ) -> None:
        super().__init__()
        arch = ARCHITECTURES.get((getattr(cfg, "architectures", None) or [""])[0], cfg.model_type)
        if arch not in ARCHITECTURES.values():
            raise ValueError(
                f"unsupported architecture {cfg.architectures} (model_type {cfg.model_type})"
            )
        self.arch = arch
        self.cfg = cfg
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        rotary = Rotary(*rope_inv_freq(cfg, head_dim))
        st = self.stage = stage or StageLayers.whole(cfg.num_hidden_layers)
        init_stage_ends(self, cfg, ps, opts.dtype, st)
        self.layers = StageLayerList(
            st, lambda i: DecoderLayer(cfg, arch, ps, i, opts, rotary, st.cache_layer(i))
        )

    @property
    def has_moe(self) -> bool:
        return any(layer.moe for layer in self.layers)

    @property
    def has_scattered_layers(self) -> bool:
        return any(layer.scattered for layer in self.layers)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The last stage: the final-normed rows. Any other: the residual stream after its last
        layer. `hidden`: the previous stage's output (every stage but the first)."""
        x = self.embed_tokens(input_ids) if hidden is None else hidden
        for layer in self.layers:
            x = layer(positions, x)
        return x if self.norm is None else self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.logits(hidden)

    def local_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's vocab shard of the logits (see VocabParallelEmbedding.local_logits)."""
        return self.lm_head.local_logits(hidden)

    def checkpoint_name(self, name: str) -> str | None:
        """Map a checkpoint key to our parameter name (None: not ours to load)."""
        name = name.replace("block_sparse_moe.", "mlp.")
        if name.startswith("lm_head.") and self.tie_word_embeddings:
            return None
        if name != "lm_head.weight":
            name = name.removeprefix("model.")
        return self.stage.param_name(name, self.tie_word_embeddings)
