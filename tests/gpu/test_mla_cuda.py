"""MLA models (DeepSeek V2 / V3) on one GPU: verify against transformers on cuda, the DP layouts
on the thread backend, and absorbed decode replayed from CUDA graphs equal to eager."""

from __future__ import annotations

from pathlib import Path

import pytest
from gpu_util import report
from test_cuda_layouts import greedy

from dpattn.tools.verify import VerifyConfig, verify


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("model", ["deepseek_v2", "deepseek_v3"])
def test_verify_cuda_1_1(mla_models: dict[str, Path], model: str, dtype: str) -> None:
    rep = verify(VerifyConfig(str(mla_models[model]), dtype=dtype, device="cuda", backend="thread"))
    assert rep["ok"], rep["step_checks"]
    report(f"verify cuda (1,1) {model} {dtype}", f"max |dlogit| {rep['max_abs_logit_diff']:.2e}")


@pytest.mark.parametrize("tp,dp,ep", [(4, 4, False), (2, 1, False), (4, 2, True)])
def test_thread_layouts_one_gpu(mla_models: dict[str, Path], tp: int, dp: int, ep: bool) -> None:
    cfg = VerifyConfig(
        str(mla_models["deepseek_v3"]), tp, dp, ep=ep, device="cuda", backend="thread"
    )
    rep = verify(cfg)
    assert rep["ok"], rep["step_checks"]
    report(
        f"thread ({tp},{dp}) deepseek_v3 ep={ep}", f"max |dlogit| {rep['max_abs_logit_diff']:.2e}"
    )


def test_graph_replay_equals_eager(mla_models: dict[str, Path]) -> None:
    """Decode graphs attend absorbed over static buffers (GraphDecodeBackend.forward_latent)."""
    model = mla_models["deepseek_v3"]
    eager, _ = greedy(model, disable_cuda_graph=True)
    graph, graph_steps = greedy(model)
    assert graph == eager
    assert graph_steps and all(s.padding_mode == "max_len" for s in graph_steps)
    report("graph == eager deepseek_v3", f"{len(graph_steps)} replayed decode steps")
