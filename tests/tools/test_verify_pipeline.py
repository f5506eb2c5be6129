"""`dpattn verify --pp-size P` (issue 27): every step goes through the stages of each lane (the
rows to the next stage, the greedy tokens back from the last), each stage runs the MLP sync on
its own groups, and the last stage's logits match transformers. Stages wired wrong (rows out of
order, a layer skipped) must fail the comparison."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import dpattn.executor.model_runner as model_runner
from dpattn.models.stage import StageLayers
from dpattn.models.tiny import make_tiny_model
from dpattn.tools.verify import VerifyConfig, verify

FP32_TOL = 1e-4


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Four decoder layers each (--pp-size 4 needs them); qwen3_moe_mixed's layer 1 is dense,
    so with --moe-dense-tp-size 1 stage 0 ends in a scattered dense layer and stage 1 starts
    with a world-wide MoE one."""
    root = tmp_path_factory.mktemp("pp-verify")
    return {
        "llama": make_tiny_model("llama", root / "llama", num_hidden_layers=4),
        "qwen3_moe": make_tiny_model("qwen3_moe", root / "qwen3_moe", num_hidden_layers=4),
        "qwen3_moe_mixed": make_tiny_model(
            "qwen3_moe", root / "mixed", num_hidden_layers=4, mlp_only_layers=[1]
        ),
        "deepseek_v3": make_tiny_model("deepseek_v3", root / "deepseek_v3"),  # 3 layers, MLA
    }


def run(model: Path, tp: int, dp: int, pp: int, **kw: Any) -> tuple[VerifyConfig, dict[str, Any]]:
    cfg = VerifyConfig(str(model), tp, dp, pp=pp, **{"backend": "thread", **kw})
    return cfg, verify(cfg)


def check(cfg: VerifyConfig, report: dict[str, Any], stages: list[list[int]]) -> None:
    assert report["ok"], report
    assert report["max_abs_logit_diff"] <= FP32_TOL, report["max_abs_logit_diff"]
    assert report["layout"]["pp"] == cfg.pp and report["layout"]["stages"] == stages
    leaks = report["kv_leaked"]
    assert len(leaks) == cfg.pp * cfg.tp and all(tuple(x) == (0, 0) for x in leaks), leaks
    assert report["steps"] and all(max(s["global_num_tokens"]) > 0 for s in report["steps"])
    requests = report["requests"].values()
    assert len(requests) == cfg.num_prompts and all(r["greedy_agree"] for r in requests)
    if cfg.moe_dense_tp_size == 1:  # an odd count: the attn_tp padding of the scattered layer
        assert any(n % 2 for s in report["steps"] for n in s["global_num_tokens"])


THREAD_CASES = [
    pytest.param("llama", 1, 1, 2, {}, [[0, 2], [2, 4]], id="llama-1x1-pp2"),
    pytest.param("llama", 2, 2, 2, {}, [[0, 2], [2, 4]], id="llama-2x2-pp2"),
    pytest.param("llama", 1, 1, 4, {}, [[0, 1], [1, 2], [2, 3], [3, 4]], id="llama-1x1-pp4"),
    pytest.param(
        "llama", 2, 1, 2, {"pp_layer_partition": [3, 1]}, [[0, 3], [3, 4]], id="llama-2x1-pp2-3.1"
    ),
    pytest.param(
        "qwen3_moe_mixed",
        2,
        1,
        2,
        {"moe_dense_tp_size": 1},
        [[0, 2], [2, 4]],
        id="mixed-2x1-dense1-pp2",
    ),
    pytest.param("qwen3_moe", 2, 2, 2, {"ep": True}, [[0, 2], [2, 4]], id="qwen3_moe-2x2-ep-pp2"),
    pytest.param("deepseek_v3", 2, 2, 2, {}, [[0, 2], [2, 3]], id="deepseek_v3-2x2-pp2"),
]


@pytest.mark.parametrize("model,tp,dp,pp,kw,stages", THREAD_CASES)
def test_pipeline_matches_reference(
    models: dict[str, Path], model: str, tp: int, dp: int, pp: int, kw: dict, stages: list
) -> None:
    check(*run(models[model], tp, dp, pp, **kw), stages)


GLOO_CASES = [
    pytest.param("llama", 1, 1, {}, id="llama-1x1-pp2"),
    pytest.param(
        "qwen3_moe", 2, 2, {"ep": True}, id="qwen3_moe-2x2-ep-pp2", marks=pytest.mark.world4
    ),
]


@pytest.mark.gloo
@pytest.mark.parametrize("model,tp,dp,kw", GLOO_CASES)
def test_gloo_pipeline(models: dict[str, Path], model: str, tp: int, dp: int, kw: dict) -> None:
    """Real processes: the rows and tokens go through gloo sends, each stage's KV pool is sized
    from memory and agreed over the lane."""
    cfg, report = run(models[model], tp, dp, 2, backend="gloo", **kw)
    check(cfg, report, [[0, 2], [2, 4]])
    _, thread_report = run(models[model], tp, dp, 2, **kw)
    assert report["steps"] == thread_report["steps"]


# ---- stages wired wrong must fail


def test_rows_out_of_order_fail(models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Stage 0 sends its rows reversed (another token's rows to each position)."""
    forward_hidden = model_runner.ModelRunner.forward_hidden

    def reversed_rows(self: model_runner.ModelRunner, *args: Any, **kw: Any) -> torch.Tensor:
        return forward_hidden(self, *args, **kw).flip(0)

    monkeypatch.setattr(model_runner.ModelRunner, "forward_hidden", reversed_rows)
    _, report = run(models["llama"], 1, 1, 2)
    assert report["ok"] is False and report["max_abs_logit_diff"] > 1e-2


def test_skipped_layer_fails(models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Stages [0, 1) and [2, 4): layer 1 runs nowhere."""

    def with_a_gap(num_layers: int, pp_size: int, partition: Any) -> list[StageLayers]:
        return [StageLayers(0, 1, True, False), StageLayers(2, num_layers, False, True)]

    monkeypatch.setattr(model_runner, "partition_layers", with_a_gap)
    _, report = run(models["llama"], 1, 1, 2)
    assert report["ok"] is False and report["max_abs_logit_diff"] > 1e-2
