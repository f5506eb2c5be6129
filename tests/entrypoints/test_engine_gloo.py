"""The Engine with gloo rank processes produces the same tokens as the in-process thread
Engine, returns every KV slot and leaves no child processes."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import pytest

from dpattn.entrypoints.engine import Engine

# ----------------------------------------------------------------------------- gloo engine

ENGINE_PROMPTS = [[5, 9, 200, 31, 77, 8, 1, 2, 3], [42], [300, 301, 302, 303], [7, 7, 7]]
ENGINE_PARAMS = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def thread_engine_outputs(tiny_models: dict[str, Path]) -> list[list[int]]:
    with Engine(str(tiny_models["qwen3_moe"]), 1, 1, backend="thread") as engine:
        outs = engine.generate(input_ids=ENGINE_PROMPTS, sampling_params=ENGINE_PARAMS)
    return [o["output_ids"] for o in outs]  # type: ignore[index]


@pytest.mark.gloo
@pytest.mark.parametrize("tp,dp", [(2, 2), (2, 1)])
def test_gloo_engine_matches_thread_engine(
    tiny_models: dict[str, Path], thread_engine_outputs: list[list[int]], tp: int, dp: int
) -> None:
    engine = Engine(
        str(tiny_models["qwen3_moe"]),
        tp,
        dp,
        backend="gloo",
        chunked_prefill_size=4,
        collective_timeout_s=30,
    )
    try:
        outs = engine.generate(input_ids=ENGINE_PROMPTS, sampling_params=ENGINE_PARAMS)
        assert [o["output_ids"] for o in outs] == thread_engine_outputs  # type: ignore[index]
        assert {o["meta_info"]["finish_reason"] for o in outs} == {"length"}  # type: ignore[index]
        if dp > 1:
            assert {o["meta_info"]["dp_rank"] for o in outs} == {0, 1}  # type: ignore[index]
        deadline = time.monotonic() + 5
        while not engine.kv_pools_full() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.kv_pools_full()
    finally:
        engine.shutdown()
    assert all(r["kv_free"] == r["kv_total"] for r in engine.rank_results)
    assert mp.active_children() == []


@pytest.mark.gloo
def test_generate_sends_a_batch_that_one_step_prefills(tiny_models: dict[str, Path]) -> None:
    """generate() sends each DP group its requests in one message, so the group's first step
    prefills all of them: none waits for a second extend because it arrived a moment later
    (rank processes poll while the frontend is still sending)."""
    with Engine(str(tiny_models["llama"]), 2, 2, backend="gloo", collective_timeout_s=30) as e:
        for rep in range(3):
            prompts = [[3 + rep, 10 + i, 20 + i, 30 + i] for i in range(12)]  # no shared prefix
            before = len(e.step_stats)
            outs = e.generate(input_ids=prompts, sampling_params=ENGINE_PARAMS)
            steps = list(e.step_stats)[before:]
            for d in (0, 1):
                extends = [s for g, s in steps if g == d and s.forward_mode == "extend"]
                mine = sum(1 for o in outs if o["meta_info"]["dp_rank"] == d)  # type: ignore[index]
                assert [s.num_tokens for s in extends] == [4 * mine], (rep, d, extends)
