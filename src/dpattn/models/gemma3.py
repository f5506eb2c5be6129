"""Gemma 3 text decoder (Gemma3ForCausalLM, and the text half of Gemma3ForConditionalGeneration).

Same sharding as DecoderModel: heads over attn_tp, embedding / LM head vocab-parallel over
attn_tp, dense GELU-tanh MLP tensor-parallel over world, DP gather / scatter in between.

Gemma differs from the pre-norm decoder in four places:
- RMSNorms scale by (1 + w) (RMSNorm offset 1.0), also the q/k norms;
- embeddings are multiplied by sqrt(hidden_size), rounded to the model dtype like HF;
- layers alternate sliding-window and global attention, each type with its own rope base;
- "sandwich" norms: the attention and MLP outputs are normalised *before* the residual add.

The sandwich norms need complete (summed) rows. The MLP side gets them for free: the DP scatter
is called with a zero residual, so it returns this group's fully reduced MLP rows, which are
normalised and added to the local residual. The attention side finishes o_proj's partial sum
with one all-reduce inside attn_tp (only when A > 1), normalises, adds the residual, and hands
the result to dp_gather as the group leader's residual with zero partials, so the gather sums
it exactly once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dpattn.distributed.parallel_state import ParallelState
from dpattn.layers.attention import Attention
from dpattn.layers.dp_attention import attn_tp_gather, attn_tp_scatter, dp_gather, dp_scatter
from dpattn.layers.forward_context import get_forward_context
from dpattn.layers.mlp import DenseMLP
from dpattn.layers.norm import RMSNorm
from dpattn.layers.rotary import Rotary
from dpattn.models.llama import ModelOptions
from dpattn.models.stage import StageLayerList, StageLayers, init_stage_ends

GEMMA3_ARCHITECTURES = ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")
GEMMA3_MODEL_TYPES = ("gemma3_text", "gemma3")
# Checkpoint prefixes of the text model: CausalLM, and ConditionalGeneration (new / old layout).
_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
_SKIPPED = ("vision_tower.", "multi_modal_projector.")


def is_gemma3(cfg: Any) -> bool:
    arch = (getattr(cfg, "architectures", None) or [""])[0]
    return arch in GEMMA3_ARCHITECTURES or getattr(cfg, "model_type", "") in GEMMA3_MODEL_TYPES


def gemma3_text_config(cfg: Any) -> Any:
    """The text config of a Gemma3ForConditionalGeneration config; a text config as it is."""
    return getattr(cfg, "text_config", None) or cfg


def layer_types(cfg: Any) -> list[str]:
    types = getattr(cfg, "layer_types", None)
    if types:
        return list(types)
    pattern = getattr(cfg, "sliding_window_pattern", None) or getattr(
        cfg, "_sliding_window_pattern", 6
    )
    return [
        "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
        for i in range(cfg.num_hidden_layers)
    ]


def rotary_for(cfg: Any, layer_type: str, head_dim: int) -> Rotary:
    """Rope of one layer type (Gemma 3: local base 10k for sliding, 1M for global layers)."""
    params = (getattr(cfg, "rope_parameters", None) or {}).get(layer_type)
    if params is None:
        raise ValueError(f"config has no rope_parameters for {layer_type!r}")
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        theta = params["rope_theta"]
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        return Rotary(inv, 1.0)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv, scaling = ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu", layer_type=layer_type)
    return Rotary(inv.float(), float(scaling))


class Gemma3DecoderLayer(nn.Module):
    def __init__(
        self,
        cfg: Any,
        ps: ParallelState,
        layer_id: int,
        opts: ModelOptions,
        rotary: Rotary,
        sliding: bool,
        cache_layer: int,
    ) -> None:
        super().__init__()
        self.ps = ps
        h, eps, dt = cfg.hidden_size, cfg.rms_norm_eps, opts.dtype
        head_dim = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
        self.input_layernorm = RMSNorm(h, eps, dt, 1.0)
        self.post_attention_layernorm = RMSNorm(h, eps, dt, 1.0)
        self.pre_feedforward_layernorm = RMSNorm(h, eps, dt, 1.0)
        self.post_feedforward_layernorm = RMSNorm(h, eps, dt, 1.0)
        self.sliding = sliding
        self.self_attn = Attention(
            ps,
            cache_layer,
            h,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            head_dim,
            rotary,
            dt,
            qk_norm_eps=eps,
            norm_offset=1.0,
            bias=bool(getattr(cfg, "attention_bias", False)),
            scaling=float(getattr(cfg, "query_pre_attn_scalar", None) or head_dim) ** -0.5,
            sliding_window=cfg.sliding_window if sliding else None,
        )
        self.scattered = opts.moe_dense_tp_size == 1
        act = getattr(cfg, "hidden_activation", None) or cfg.hidden_act
        self.mlp = DenseMLP(ps, h, cfg.intermediate_size, act, dt, self.scattered)

    def _ffn(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.pre_feedforward_layernorm(hidden))

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ps, plan = self.ps, get_forward_context().plan
        attn = self.self_attn(positions, self.input_layernorm(x))
        if ps.attn_tp_size > 1:  # the norm needs whole rows of o_proj's output
            attn = ps.attn_tp.all_reduce(attn)
        local = x + self.post_attention_layernorm(attn)  # local rows, same on all of attn_tp
        zeros = torch.zeros_like(local)
        if self.scattered:
            chunk = attn_tp_scatter(ps, plan, zeros, local)
            chunk = chunk + self.post_feedforward_layernorm(self._ffn(chunk))
            return attn_tp_gather(ps, plan, chunk)
        hidden = dp_gather(ps, plan, zeros, local)  # only the leader's residual is summed
        mlp = dp_scatter(ps, plan, self._ffn(hidden), torch.zeros_like(hidden))
        return local + self.post_feedforward_layernorm(mlp)


class Gemma3Model(nn.Module):
    """Gemma 3 text model with the DecoderModel interface (forward, logits, checkpoint_name)."""

    def __init__(
        self, cfg: Any, ps: ParallelState, opts: ModelOptions, stage: StageLayers | None = None
    ) -> None:
        super().__init__()
        cfg = gemma3_text_config(cfg)
        if getattr(cfg, "attn_logit_softcapping", None):
            raise ValueError("attn_logit_softcapping is not supported (Gemma 3 does not use it)")
        if getattr(cfg, "use_bidirectional_attention", False):
            raise ValueError("bidirectional (embedding) Gemma 3 models are not supported")
        self.arch = "gemma3"
        self.cfg = cfg
        h = cfg.hidden_size
        head_dim = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
        # The local / global pattern and each type's rope come from the GLOBAL layer index, so
        # a pipeline stage's layers are the same as the whole model's.
        types = layer_types(cfg)
        rotaries = {t: rotary_for(cfg, t, head_dim) for t in sorted(set(types))}
        st = self.stage = stage or StageLayers.whole(cfg.num_hidden_layers)
        init_stage_ends(self, cfg, ps, opts.dtype, st, norm_offset=1.0, tie_default=True)
        # HF: embedding * tensor(sqrt(hidden)).to(weight dtype) -> rounded to bf16 in bf16.
        self.register_buffer("embed_scale", torch.tensor(h**0.5).to(opts.dtype), persistent=False)
        self.layers = StageLayerList(
            st,
            lambda i: Gemma3DecoderLayer(
                cfg,
                ps,
                i,
                opts,
                rotaries[types[i]],
                types[i] == "sliding_attention",
                st.cache_layer(i),
            ),
        )
        self.final_logit_softcapping = getattr(cfg, "final_logit_softcapping", None)

    has_moe = False

    @property
    def has_scattered_layers(self) -> bool:
        return any(layer.scattered for layer in self.layers)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor | None = None
    ) -> torch.Tensor:
        """As DecoderModel.forward: `hidden` from the previous stage, normed rows on the last."""
        x = self.embed_tokens(input_ids) * self.embed_scale if hidden is None else hidden
        for layer in self.layers:
            x = layer(positions, x)
        return x if self.norm is None else self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._softcap(self.lm_head.logits(hidden))

    def local_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's vocab shard of the logits (see VocabParallelEmbedding.local_logits)."""
        return self._softcap(self.lm_head.local_logits(hidden))

    def _softcap(self, logits: torch.Tensor) -> torch.Tensor:
        cap = self.final_logit_softcapping
        return torch.tanh(logits / cap) * cap if cap else logits

    def checkpoint_name(self, name: str) -> str | None:
        """Map a checkpoint key to our parameter name (None: not ours to load)."""
        if name.startswith("lm_head."):
            return None if self.tie_word_embeddings else self.stage.param_name(name, False)
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name = name.removeprefix(prefix)
                break
        if name.startswith(_SKIPPED):
            return None
        return self.stage.param_name(name, self.tie_word_embeddings)
