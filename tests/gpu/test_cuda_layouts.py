"""dpattn on one GPU: `dpattn verify` at (1,1), the whole multi-rank protocol on the thread
backend (every rank's tensors on the same GPU), and decode CUDA graphs equal to eager."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from gpu_util import dpattn_cli, last_json, report

from dpattn.entrypoints.engine import Engine
from dpattn.tools.verify import VerifyConfig, verify


def test_verify_cli_cuda_1_1(tiny_models: dict[str, Path]) -> None:
    """`dpattn verify --device cuda`: one NCCL rank process on cuda:0 against transformers."""
    run = dpattn_cli("verify", "--model-path", str(tiny_models["llama"]), "--device", "cuda")
    assert run.returncode == 0, run.stderr[-3000:]
    rep = last_json(run.stdout)
    assert rep["ok"] and (rep["config"]["device"], rep["config"]["backend"]) == ("cuda", "nccl")
    report("verify cuda (1,1) llama", f"max |dlogit| {rep['max_abs_logit_diff']:.2e}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", ["qwen3_moe", "gemma3"])
def test_verify_cuda_1_1(
    tiny_models: dict[str, Path], tiny_gemma3: Path, arch: str, dtype: str
) -> None:
    model = tiny_gemma3 if arch == "gemma3" else tiny_models[arch]
    rep = verify(VerifyConfig(str(model), dtype=dtype, device="cuda", backend="thread"))
    assert rep["ok"], rep["step_checks"]
    report(f"verify cuda (1,1) {arch} {dtype}", f"max |dlogit| {rep['max_abs_logit_diff']:.2e}")


# (tp, dp, model, options): EP and the scattered dense layout on one GPU
THREAD_LAYOUTS: list[tuple[int, int, str, dict[str, Any]]] = [
    (2, 2, "qwen3_moe", {"ep": True}),
    (2, 2, "llama", {"moe_dense_tp_size": 1}),
    (4, 2, "qwen3_moe_mixed", {"moe_dense_tp_size": 1}),
    (4, 2, "mixtral", {"ep": True}),
    (2, 2, "gemma3", {}),
]


@pytest.mark.parametrize("tp,dp,arch,opts", THREAD_LAYOUTS, ids=lambda v: str(v))
def test_thread_backend_one_gpu(
    all_models: dict[str, Path],
    tiny_gemma3: Path,
    tp: int,
    dp: int,
    arch: str,
    opts: dict[str, Any],
) -> None:
    model = tiny_gemma3 if arch == "gemma3" else all_models[arch]
    cfg = VerifyConfig(str(model), tp, dp, device="cuda", backend="thread", **opts)
    rep = verify(cfg)
    assert rep["ok"], rep["step_checks"]
    assert {s["mode"] for s in rep["steps"]} <= {"max_len", "sum_len"}
    report(f"thread ({tp},{dp}) {arch} {opts}", f"max |dlogit| {rep['max_abs_logit_diff']:.2e}")


# ---------------------------------------------------------------- CUDA graphs against eager

# 5 prompts: the graph pads them to its batch of 8; the long one moves to the 512 KV bucket.
PROMPTS = [[5, 9, 200, 31, 77, 8, 1, 2, 3], [42], [300, 301, 302, 303], [7, 7, 7], [11] * 300]
PARAMS = {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True}


def greedy(model: Path, **options: Any) -> tuple[list[list[int]], list[Any]]:
    with Engine(str(model), 1, 1, device="cuda", kv_pool_tokens=4096, **options) as engine:
        outs = engine.generate(input_ids=PROMPTS, sampling_params=PARAMS)
        stats = [s for _, s in engine.step_stats if s.forward_mode == "decode"]
    return [o["output_ids"] for o in outs], stats  # type: ignore[index]


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe", "gemma3"])
def test_graph_replay_equals_eager(
    tiny_models: dict[str, Path], tiny_gemma3: Path, arch: str
) -> None:
    model = tiny_gemma3 if arch == "gemma3" else tiny_models[arch]
    eager, eager_steps = greedy(model, disable_cuda_graph=True)
    graph, graph_steps = greedy(model)  # NCCL rank process, graphs captured at start-up
    assert graph == eager
    # A replay pads to the captured size with MAX_LEN; an eager decode at D == 1 is SUM_LEN.
    assert graph_steps and all(s.padding_mode == "max_len" for s in graph_steps)
    assert {s.padded_tokens for s in graph_steps} <= {1, 2, 4, 8, 16, 24, 32}
    assert all(s.padding_mode == "sum_len" for s in eager_steps)
    report(f"graph == eager {arch}", f"{len(graph_steps)} replayed decode steps")


def test_thread_backend_refuses_graphs_and_runs_eagerly(tiny_models: dict[str, Path]) -> None:
    """Thread ranks' collectives are a Python rendezvous: no graph, the same tokens."""
    eager, _ = greedy(tiny_models["llama"], disable_cuda_graph=True)
    with Engine(str(tiny_models["llama"]), 2, 2, device="cuda", backend="thread") as engine:
        outs = engine.generate(input_ids=PROMPTS, sampling_params=PARAMS)
        modes = {s.padding_mode for _, s in engine.step_stats if s.forward_mode == "decode"}
    assert [o["output_ids"] for o in outs] == eager  # type: ignore[index]
    assert modes and modes <= {"max_len", "sum_len"}
