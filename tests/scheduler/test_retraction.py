"""Retraction without thrashing: a retracted request comes back only when it has room to run
to its end, so long requests on a small KV pool do not take turns one token at a time."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpattn.config import RunnerConfig, SchedulerConfig
from dpattn.distributed.parallel_state import Layout, ParallelState
from dpattn.executor.model_runner import ModelRunner
from dpattn.executor.sampling_params import SamplingParams
from dpattn.runtime.launch import run_ranks
from dpattn.scheduler.schedule_batch import Req
from dpattn.scheduler.scheduler import Scheduler


def _drive(ps: ParallelState, model: str, pool: int, cache: bool) -> tuple[int, dict]:
    runner = ModelRunner(RunnerConfig(model, kv_pool_tokens=pool), ps)
    sched = Scheduler(runner, SchedulerConfig(disable_radix_cache=not cache), set())
    params = SamplingParams(max_new_tokens=100, temperature=0.0, ignore_eos=True)
    for i in range(4):
        sched.add_request(Req(f"r{i}", [5 + i] * 20, params, 0))
    out: dict[str, list[int]] = {}
    while sched.has_work:
        sched.step()
        for o in sched.take_outputs():
            out.setdefault(o.rid, []).extend(o.new_ids)
    sched.flush_cache()
    assert runner.kv_pool.available_size() == pool
    return sched.num_retractions, out


@pytest.mark.parametrize("cache", [False, True])
def test_long_requests_on_a_small_pool_do_not_thrash(
    tiny_models: dict[str, Path], cache: bool
) -> None:
    model = str(tiny_models["llama"])
    # 160 slots: two of the four 120-token requests fit at a time, not three.
    [(retractions, out)] = run_ranks(
        lambda ps: _drive(ps, model, 160, cache), Layout(1, 1), "thread"
    )
    [(none, ref)] = run_ranks(lambda ps: _drive(ps, model, 1024, cache), Layout(1, 1), "thread")
    assert out == ref and none == 0
    # Re-admitted as soon as one slot was free, the requests were retracted 181 (171 with the
    # cache) times on this workload, one re-prefill per token; waiting for room: 6.
    assert 0 < retractions <= 12, retractions
