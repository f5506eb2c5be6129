"""Layout verifier (issue 2): every layout's logits match HF transformers, KV never leaks.

Thread-backend runs cover the layout matrix; a few real gloo process worlds and the CLI run end
to end. See docs/design.md §4 (padding) and §7 (invariants).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dpattn.models.tiny import ARCHS, MOE_ARCHS, make_tiny_model
from dpattn.tools.verify import VerifyConfig, verify

LAYOUTS = [(1, 1), (2, 1), (2, 2), (4, 2), (4, 4)]
EP_LAYOUTS = [(2, 2), (4, 2), (4, 4)]  # EP needs num_experts (8) % T == 0
FP32_TOL = 1e-4


def run_verify(model: Path, tp: int, dp: int, **kw: Any) -> tuple[VerifyConfig, dict[str, Any]]:
    cfg = VerifyConfig(str(model), tp, dp, **{"backend": "thread", **kw})
    return cfg, verify(cfg)


def check_report(cfg: VerifyConfig, report: dict[str, Any], tol: float = FP32_TOL) -> None:
    """Passes within tol, no KV leak, and every step's gather plan obeys docs/design.md §4."""
    assert report["ok"], report
    assert report["max_abs_logit_diff"] <= tol, report["max_abs_logit_diff"]
    check_schedule(cfg, report)


def check_schedule(cfg: VerifyConfig, report: dict[str, Any]) -> None:
    """No KV leak; every step's token counts and gather plan obey docs/design.md §4 and the config."""
    assert len(report["kv_leaked"]) == cfg.tp
    assert all(tuple(leak) == (0, 0) for leak in report["kv_leaked"]), report["kv_leaked"]
    steps = report["steps"]
    assert steps, "no forward step ran"
    a = cfg.tp // cfg.dp
    for s in steps:
        gnt = s["global_num_tokens"]
        assert len(gnt) == cfg.dp
        assert max(gnt) > 0  # steps with no tokens anywhere are skipped, never run
        padded = [math.ceil(n / a) * a for n in gnt]
        if s["mode"] == "max_len":
            assert s["buffer"] == cfg.dp * max(padded), s
        else:
            assert s["mode"] == "sum_len", s
            assert s["buffer"] == sum(padded), s
    if cfg.dp > 1 and cfg.idle_group:  # the last DP group never gets a request
        assert all(s["global_num_tokens"][-1] == 0 for s in steps), steps
    if cfg.dp_padding_mode != "auto":
        assert {s["mode"] for s in steps} == {cfg.dp_padding_mode}


def has_odd_count(report: dict[str, Any]) -> bool:
    return any(n % 2 for s in report["steps"] for n in s["global_num_tokens"])


# --------------------------------------------------------------------------- thread backend


@pytest.mark.parametrize("tp,dp", LAYOUTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_layout_matches_reference(tiny_models: dict[str, Path], arch: str, tp: int, dp: int):
    check_report(*run_verify(tiny_models[arch], tp, dp))


@pytest.mark.parametrize("tp,dp", EP_LAYOUTS)
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_expert_parallel(tiny_models: dict[str, Path], arch: str, tp: int, dp: int):
    check_report(*run_verify(tiny_models[arch], tp, dp, ep=True))


@pytest.mark.parametrize("tp,dp", [(2, 1), (4, 2)])
@pytest.mark.parametrize("model", [*ARCHS, "qwen3_moe_mixed"])
def test_scattered_dense_mlp(all_models: dict[str, Path], model: str, tp: int, dp: int):
    """moe_dense_tp_size=1 with odd token counts: attn_tp padding must apply, also at dp=1."""
    cfg, report = run_verify(all_models[model], tp, dp, moe_dense_tp_size=1)
    check_report(cfg, report)
    assert has_odd_count(report), "no odd token count: the padding case was not exercised"


@pytest.mark.parametrize("tp,dp", [(2, 2), (4, 4)])
@pytest.mark.parametrize("arch", ARCHS)
def test_no_idle_group(tiny_models: dict[str, Path], arch: str, tp: int, dp: int):
    # 9 prompts: every DP group (the last one included) gets at least one request.
    cfg, report = run_verify(tiny_models[arch], tp, dp, idle_group=False, num_prompts=9)
    check_report(cfg, report)
    for d in range(dp):
        assert any(s["global_num_tokens"][d] > 0 for s in report["steps"]), (d, report["steps"])


@pytest.mark.parametrize("mode", ["max_len", "sum_len"])
@pytest.mark.parametrize("arch", ARCHS)
def test_padding_mode_override(tiny_models: dict[str, Path], arch: str, mode: str):
    check_report(*run_verify(tiny_models[arch], 4, 2, dp_padding_mode=mode))


@pytest.mark.parametrize("ep", [False, True])
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_per_expert_keys(per_expert_models: dict[str, Path], arch: str, ep: bool):
    check_report(*run_verify(per_expert_models[arch], 2, 2, ep=ep))


@pytest.mark.parametrize("arch", ARCHS)
def test_bfloat16(tiny_models: dict[str, Path], arch: str):
    # Default bf16 tolerance (0.25) is a few bf16 ulps at |logit| ~ 4-8; the tiny MoE router is
    # sharp enough that bf16 rounding does not flip top-k choices.
    cfg, report = run_verify(tiny_models[arch], 2, 2, dtype="bfloat16")
    assert report["atol"] == 0.25 and report["rtol"] == 1 / 32
    check_schedule(cfg, report)
    assert report["ok"], report["requests"]


@pytest.fixture(scope="module")
def other_seed_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("other-seed")
    return {a: make_tiny_model(a, root / a, seed=1) for a in ("llama", "qwen3_moe")}


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_wrong_reference_fails(
    tiny_models: dict[str, Path], other_seed_models: dict[str, Path], arch: str
):
    cfg, report = run_verify(
        tiny_models[arch], 2, 2, reference_model_path=str(other_seed_models[arch])
    )
    check_schedule(cfg, report)  # no leak: ok is False because of the logits alone
    assert report["ok"] is False
    assert report["max_abs_logit_diff"] > 1e-2


# --------------------------------------------------------------------------- gloo processes

GLOO_CASES = [
    pytest.param("qwen3_moe", 2, 2, {}, id="qwen3_moe-2x2"),
    pytest.param("qwen3_moe", 2, 1, {}, id="qwen3_moe-2x1"),
    # qwen3_moe with a dense layer 0, so moe_dense_tp_size=1 really scatters inside attn_tp
    pytest.param(
        "qwen3_moe_mixed", 2, 1, {"moe_dense_tp_size": 1}, id="qwen3_moe_mixed-2x1-dense1"
    ),
    pytest.param("qwen3_moe", 4, 2, {"ep": True}, id="qwen3_moe-4x2-ep", marks=pytest.mark.world4),
]


@pytest.mark.gloo
@pytest.mark.parametrize("model,tp,dp,kw", GLOO_CASES)
def test_gloo_processes(all_models: dict[str, Path], model: str, tp: int, dp: int, kw: dict):
    cfg, report = run_verify(all_models[model], tp, dp, backend="gloo", **kw)
    check_report(cfg, report)
    if kw.get("moe_dense_tp_size") == 1:
        assert has_odd_count(report)
    # Same schedule (token counts, padding mode, buffer sizes) as the in-process world.
    _, thread_report = run_verify(all_models[model], tp, dp, **kw)
    assert report["steps"] == thread_report["steps"]


# --------------------------------------------------------------------------- CLI


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dpattn.cli", *args],
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.fixture(scope="module")
def cli_mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "mixtral"
    proc = run_cli("make-tiny-model", "--arch", "mixtral", "--out", str(out), "--num-layers", "3")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and config["model_type"] == "mixtral"
    return out


VERIFY_2X2 = ("verify", "--tp", "2", "--dp", "2", "--backend", "thread")


def last_json(stdout: str) -> dict[str, Any]:
    return json.loads(stdout.strip().splitlines()[-1])


def test_cli_verify_ok(cli_mixtral: Path):
    proc = run_cli(*VERIFY_2X2, "--model-path", str(cli_mixtral))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = last_json(proc.stdout)
    assert report["ok"] is True
    assert report["max_abs_logit_diff"] <= FP32_TOL
    assert report["layout"] == {
        "tp": 2,
        "dp": 2,
        "attn_tp": 1,
        "ep": False,
        "pp": 1,
        "stages": [[0, 3]],  # --pp-size 1: one stage, every layer
    }
    assert all(leak == [0, 0] for leak in report["kv_leaked"])


def test_cli_verify_wrong_reference(cli_mixtral: Path, tmp_path: Path):
    other = make_tiny_model("mixtral", tmp_path / "other", seed=1, num_hidden_layers=3)
    proc = run_cli(
        *VERIFY_2X2, "--model-path", str(cli_mixtral), "--reference-model-path", str(other)
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = last_json(proc.stdout)
    assert report["ok"] is False
    assert report["max_abs_logit_diff"] > 1e-2
