"""DeepSeekMoE against transformers' own modules: routing (V2 group-limited softmax, V3 sigmoid
with a correction bias that steers the choice only), the routed scaling factor, shared experts,
and padding rows that never reach an expert. Each test would fail under the mutation it names.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import DeepseekV2Config, DeepseekV3Config
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

from dpattn.layers.dp_attention import GatherPlan
from dpattn.layers.forward_context import ForwardContext, forward_context
from dpattn.layers.moe import MoE, select_experts
from dpattn.models.deepseek import check_config, routing

H, E, INTER = 32, 16, 8
CPU_PS = SimpleNamespace(device=torch.device("cpu"), tp_size=1, rank=0)


def hf_config(arch: str, **kw: Any) -> Any:
    common = dict(hidden_size=H, moe_intermediate_size=INTER, n_routed_experts=E)
    common.update(num_experts_per_tok=4, n_group=4, topk_group=2, num_hidden_layers=1)
    common.update(num_attention_heads=4, num_key_value_heads=4)
    if arch == "deepseek_v3":
        cfg = DeepseekV3Config(
            **common, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True, **kw
        )
    else:
        cfg = DeepseekV2Config(
            **common,
            n_shared_experts=2,
            routed_scaling_factor=1.5,
            topk_method="group_limited_greedy",
            **kw,
        )
    cfg.architectures = [
        "DeepseekV3ForCausalLM" if arch == "deepseek_v3" else "DeepseekV2ForCausalLM"
    ]
    return cfg


def hf_moe(arch: str) -> torch.nn.Module:
    cfg = hf_config(arch)
    moe = (DeepseekV3MoE if arch == "deepseek_v3" else DeepseekV2Moe)(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in [*moe.named_parameters(), *moe.named_buffers()]:
            std = 1.0 if "gate" in name and "proj" not in name else 0.2
            t.copy_(torch.randn(t.shape, generator=gen) * std)
    return moe


def our_moe(arch: str, hf: torch.nn.Module) -> MoE:
    cfg = hf_config(arch)
    shared = INTER * cfg.n_shared_experts
    moe = MoE(CPU_PS, H, INTER, E, routing(cfg), "silu", torch.float32, False, shared)  # type: ignore[arg-type]
    sd = hf.state_dict()
    with torch.no_grad():
        moe.gate.copy_(sd["gate.weight"])
        moe.w13.copy_(sd["experts.gate_up_proj"])
        moe.w2.copy_(sd["experts.down_proj"])
        s = moe.shared_experts
        s.gate_up_proj.copy_(
            torch.cat([sd["shared_experts.gate_proj.weight"], sd["shared_experts.up_proj.weight"]])
        )
        s.down_proj.copy_(sd["shared_experts.down_proj.weight"])
        if arch == "deepseek_v3":
            moe.e_score_correction_bias.copy_(sd["gate.e_score_correction_bias"])
    return moe


def run(moe: MoE, x: torch.Tensor, real_rows: torch.Tensor | None = None) -> torch.Tensor:
    ctx = ForwardContext(None, CPU_PS, None, real_rows)  # type: ignore[arg-type]
    with forward_context(ctx), torch.inference_mode():
        return moe(x)


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_routing_equals_transformers(arch: str) -> None:
    """Same experts and weights as transformers' router, which the routing mutations break:
    weights from the biased scores, scaling applied twice or never, group selection skipped."""
    hf = hf_moe(arch)
    ours = our_moe(arch, hf)
    x = torch.randn(64, H, generator=torch.Generator().manual_seed(2))
    _, ref_w, ref_ids = hf.gate(x)
    weights, ids = ours.route_weights(x)
    order, ref_order = ids.argsort(-1), ref_ids.argsort(-1)
    assert torch.equal(ids.gather(1, order), ref_ids.gather(1, ref_order))
    torch.testing.assert_close(weights.gather(1, order), ref_w.gather(1, ref_order))
    r = ours.routing
    # The inputs are such that each mutation changes the result (else the test proves nothing).
    logits = torch.nn.functional.linear(x, ours.gate)
    bias = ours.e_score_correction_bias if r.correction_bias else None
    for mutation in (
        dataclasses.replace(r, num_groups=1, topk_groups=1),  # group selection skipped
        dataclasses.replace(r, scaling_factor=1.0),  # scaling factor not applied
        dataclasses.replace(r, scaling_factor=r.scaling_factor**2),  # applied twice
    ):
        w, i = select_experts(logits, mutation, bias)
        assert not (
            torch.equal(i.sort(-1).values, ids.sort(-1).values)
            and torch.allclose(w.sort(-1).values, weights.sort(-1).values)
        )


def test_correction_bias_steers_the_choice_not_the_weights() -> None:
    hf = hf_moe("deepseek_v3")
    ours = our_moe("deepseek_v3", hf)
    x = torch.randn(64, H, generator=torch.Generator().manual_seed(3))
    logits = torch.nn.functional.linear(x, ours.gate)
    bias = ours.e_score_correction_bias
    weights, ids = select_experts(logits, ours.routing, bias)
    unbiased_ids = select_experts(logits, ours.routing, None)[1]
    assert not torch.equal(ids.sort(-1).values, unbiased_ids.sort(-1).values)  # bias matters
    # weights are the unbiased sigmoid scores of the chosen experts, renormalised and scaled
    scores = logits.sigmoid().gather(1, ids)
    expected = scores / (scores.sum(-1, keepdim=True) + 1e-20) * ours.routing.scaling_factor
    torch.testing.assert_close(weights, expected)
    biased = (logits.sigmoid() + bias).gather(1, ids)
    assert not torch.allclose(weights, biased / biased.sum(-1, keepdim=True) * 2.5)


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_moe_layer_equals_transformers(arch: str) -> None:
    """Routed experts plus shared experts (dropping the shared experts fails this)."""
    hf = hf_moe(arch)
    ours = our_moe(arch, hf)
    x = torch.randn(16, H, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = hf(x[None])[0]
        shared = hf.shared_experts(x)
    out = run(ours, x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert shared.abs().max() > 1e-2  # dropped shared experts would move the output this much


def test_padding_rows_reach_no_expert(monkeypatch: pytest.MonkeyPatch) -> None:
    """Padding rows of a MAX_LEN buffer: neither routed nor fed to the shared experts."""
    plan = GatherPlan.build([3, 1], 2, override="max_len")
    real = plan.real_rows()
    assert real is not None
    hf = hf_moe("deepseek_v3")
    ours = our_moe("deepseek_v3", hf)
    routed: list[int] = []
    route = ours.route_weights

    def spy(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        routed.append(x.shape[0])
        return route(x)

    monkeypatch.setattr(ours, "route_weights", spy)
    x = torch.randn(plan.total, H)
    out = run(ours, x, real)
    assert routed == [len(real)]
    pad = [i for i in range(plan.total) if i not in real.tolist()]
    assert torch.count_nonzero(out[pad]) == 0
    with torch.no_grad():
        torch.testing.assert_close(out[real], hf(x[real][None])[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "arch,field,value",
    [
        ("deepseek_v3", "topk_method", "group_limited_greedy"),
        ("deepseek_v2", "topk_method", "noaux_tc"),
        ("deepseek_v3", "scoring_func", "softmax"),
        ("deepseek_v2", "norm_topk_prob", True),
        ("deepseek_v3", "attention_bias", True),
        ("deepseek_v3", "rope_parameters", {"rope_type": "longrope", "rope_theta": 10000.0}),
    ],
)
def test_unsupported_config_is_refused_naming_the_field(arch: str, field: str, value: Any) -> None:
    cfg = hf_config(arch)
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=field.split("_")[0]):
        check_config(cfg)
