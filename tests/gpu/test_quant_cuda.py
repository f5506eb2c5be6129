"""Quantized weights (issue 25) on one GPU: no int4 kernel there yet, so the integer formats run
dense (int8 / int4: their quantized values; gguf: its exact values) and FP8 is dequantized at
load; verify against transformers in the model dtype's own bound, on cuda and thread layouts."""

from __future__ import annotations

from pathlib import Path

import pytest
from gpu_util import report

from dpattn.tools.verify import VerifyConfig, verify


@pytest.mark.parametrize("tp,dp", [(1, 1), (2, 2)])
@pytest.mark.parametrize("arch", ["llama", "deepseek_v3"])
def test_fp8_cuda(fp8_models: dict[str, tuple[Path, Path, Path]], arch: str, tp: int, dp: int):
    _, fp8, ref = fp8_models[arch]
    cfg = VerifyConfig(
        str(fp8), tp, dp, device="cuda", backend="thread", reference_model_path=str(ref)
    )
    rep = verify(cfg)
    assert rep["ok"] and rep["quantization"] == "fp8", rep["step_checks"]
    report(f"fp8 cuda ({tp},{dp}) {arch}", f"max |dlogit| {rep['max_abs_logit_diff']:.2e}")


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("tp,dp", [(1, 1), (2, 2)])
def test_int_formats_cuda(tiny_models: dict[str, Path], method: str, tp: int, dp: int) -> None:
    cfg = VerifyConfig(
        str(tiny_models["llama"]),
        tp,
        dp,
        device="cuda",
        backend="thread",
        quantization=method,
        quant_group_size=32,
    )
    rep = verify(cfg)
    assert rep["ok"] and rep["kernel_dtype"] == "float32", rep["step_checks"]
    report(f"{method} cuda ({tp},{dp})", f"max |dlogit| {rep['max_abs_logit_diff']:.2e}")


def test_gemma_gguf_cuda(gemma_model: Path) -> None:
    """The default model's GGUF sidecar read on a GPU: its exact values, fp32 bound."""
    rep = verify(VerifyConfig(str(gemma_model), device="cuda", backend="thread"))
    assert rep["ok"] and rep["quantization"] == "gguf", rep["step_checks"]
    report("gguf cuda (1,1) gemma", f"max |dlogit| {rep['max_abs_logit_diff']:.2e}")
