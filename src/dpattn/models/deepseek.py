"""DeepSeek V2 / V3 (and their MLA derivatives): multi-head latent attention + DeepSeekMoE.

The decoder layer is the Llama family's (attention on the group's rows -> DP gather -> MLP/MoE
over world -> DP scatter), with MLA attention (layers/mla.py) and a MoE layer with grouped
routing and shared experts from `first_k_dense_replace` on (dense MLP below).

A config that asks for something not implemented here is refused at load, naming the field:
it is never approximated.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import torch
from torch import nn

from dpattn.distributed.parallel_state import ParallelState
from dpattn.layers.activation import ACTIVATIONS
from dpattn.layers.mla import MLAAttention
from dpattn.layers.mlp import DenseMLP
from dpattn.layers.moe import MoE, Routing
from dpattn.layers.norm import RMSNorm
from dpattn.layers.rotary import Rotary, rope_inv_freq
from dpattn.models.llama import DecoderLayer, DecoderModel, ModelOptions
from dpattn.models.stage import StageLayerList, StageLayers, init_stage_ends

ARCHITECTURES = {"DeepseekV2ForCausalLM": "deepseek_v2", "DeepseekV3ForCausalLM": "deepseek_v3"}
ROPE_TYPES = ("default", "yarn")
log = logging.getLogger(__name__)
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def is_deepseek(cfg: Any) -> bool:
    arch = (getattr(cfg, "architectures", None) or [""])[0]
    return arch in ARCHITECTURES or getattr(cfg, "model_type", None) in ARCHITECTURES.values()


def _arch(cfg: Any) -> str:
    arch = (getattr(cfg, "architectures", None) or [""])[0]
    return ARCHITECTURES.get(arch, cfg.model_type)


def rope_parameters(cfg: Any) -> dict[str, Any]:
    return dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})


def check_config(cfg: Any) -> None:
    """Refuse, naming the field, whatever this implementation would otherwise approximate."""
    v3 = _arch(cfg) == "deepseek_v3"

    def refuse(field: str, value: Any, why: str) -> None:
        raise ValueError(f"unsupported {_arch(cfg)} config: {field}={value!r} ({why})")

    rope = rope_parameters(cfg)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        refuse("rope_parameters.rope_type", rope_type, f"dpattn implements {ROPE_TYPES}")
    method = getattr(cfg, "topk_method", None)
    methods = (None, "noaux_tc") if v3 else ("greedy", "group_limited_greedy")
    if method not in methods:
        refuse("topk_method", method, f"dpattn implements {[m for m in methods if m]}")
    scoring = getattr(cfg, "scoring_func", None)
    if scoring not in (None, "sigmoid" if v3 else "softmax"):
        refuse("scoring_func", scoring, "V3 routes with sigmoid scores, V2 with softmax")
    if not v3 and getattr(cfg, "norm_topk_prob", False):
        refuse("norm_topk_prob", True, "transformers' DeepseekV2 never renormalises")
    for field in ("attention_bias", "mlp_bias"):
        if getattr(cfg, field, False):
            refuse(field, True, "no bias terms are implemented for DeepSeek")
    if (getattr(cfg, "moe_layer_freq", 1) or 1) != 1:
        refuse("moe_layer_freq", cfg.moe_layer_freq, "every layer from first_k_dense_replace")
    if cfg.hidden_act not in ACTIVATIONS:
        refuse("hidden_act", cfg.hidden_act, f"dpattn implements {sorted(ACTIVATIONS)}")


def softmax_scale(cfg: Any) -> float:
    """1/sqrt(qk head dim), times YaRN's mscale squared when mscale_all_dim is set."""
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    params = rope_parameters(cfg)
    mscale_all_dim = params.get("mscale_all_dim", 0)
    factor = params.get("factor", 1.0)
    if params.get("rope_type", "default") != "default" and mscale_all_dim and factor > 1:
        mscale = 0.1 * mscale_all_dim * math.log(factor) + 1.0
        scale *= mscale * mscale
    return scale


def routing(cfg: Any) -> Routing:
    v3 = _arch(cfg) == "deepseek_v3"
    grouped = v3 or getattr(cfg, "topk_method", "greedy") == "group_limited_greedy"
    return Routing(
        top_k=cfg.num_experts_per_tok,
        norm_topk_prob=bool(getattr(cfg, "norm_topk_prob", False)) and v3,
        scoring="sigmoid" if v3 else "softmax",
        num_groups=int(cfg.n_group or 1) if grouped else 1,
        topk_groups=int(cfg.topk_group or 1) if grouped else 1,
        group_score="top2" if v3 else "max",
        scaling_factor=float(cfg.routed_scaling_factor),
        correction_bias=v3,
    )


class DeepseekDecoderLayer(DecoderLayer):
    """The Llama layer's forward over MLA attention and DeepSeekMoE (or a dense MLP)."""

    def __init__(
        self,
        cfg: Any,
        ps: ParallelState,
        layer_id: int,
        opts: ModelOptions,
        rotary: Rotary,
        cache_layer: int,
    ) -> None:
        nn.Module.__init__(self)
        self.ps = ps
        h, eps, dt = cfg.hidden_size, cfg.rms_norm_eps, opts.dtype
        self.input_layernorm = RMSNorm(h, eps, dt)
        self.post_attention_layernorm = RMSNorm(h, eps, dt)
        self.self_attn = MLAAttention(
            ps,
            cache_layer,
            h,
            cfg.num_attention_heads,
            cfg.q_lora_rank or None,
            cfg.kv_lora_rank,
            cfg.qk_nope_head_dim,
            cfg.qk_rope_head_dim,
            cfg.v_head_dim,
            rotary,
            softmax_scale(cfg),
            eps,
            dt,
            opts.mla_mode,
        )
        experts = int(getattr(cfg, "n_routed_experts", 0) or 0)
        self.moe = experts > 0 and layer_id >= (cfg.first_k_dense_replace or 0)
        self.scattered = not self.moe and opts.moe_dense_tp_size == 1
        if self.moe:
            self.mlp: nn.Module = MoE(
                ps,
                h,
                cfg.moe_intermediate_size,
                experts,
                routing(cfg),
                cfg.hidden_act,
                dt,
                opts.ep,
                shared_inter=cfg.moe_intermediate_size * (cfg.n_shared_experts or 0),
                gate_dtype=torch.float32,
            )
        else:
            self.mlp = DenseMLP(ps, h, cfg.intermediate_size, cfg.hidden_act, dt, self.scattered)


class DeepseekModel(DecoderModel):
    def __init__(
        self, cfg: Any, ps: ParallelState, opts: ModelOptions, stage: StageLayers | None = None
    ) -> None:
        nn.Module.__init__(self)
        check_config(cfg)
        self.arch, self.cfg = _arch(cfg), cfg
        inv_freq, attention_factor = rope_inv_freq(cfg, cfg.qk_rope_head_dim)
        # V2 always pairs interleaved dims (complex form); V3 unless rope_interleave is off
        interleaved = self.arch == "deepseek_v2" or bool(getattr(cfg, "rope_interleave", True))
        rotary = Rotary(inv_freq, attention_factor, interleaved)
        st = self.stage = stage or StageLayers.whole(cfg.num_hidden_layers)
        init_stage_ends(self, cfg, ps, opts.dtype, st)
        self.layers = StageLayerList(
            st, lambda i: DeepseekDecoderLayer(cfg, ps, i, opts, rotary, st.cache_layer(i))
        )
        self._logged_mtp = ps.rank != 0

    def checkpoint_name(self, name: str) -> str | None:
        m = _LAYER.match(name)
        if m and int(m[1]) >= self.cfg.num_hidden_layers:
            if not self._logged_mtp:
                self._logged_mtp = True
                n = getattr(self.cfg, "num_nextn_predict_layers", None)
                log.info("skipping the checkpoint's multi-token-prediction layers (%s)", n)
            return None
        return super().checkpoint_name(name)
