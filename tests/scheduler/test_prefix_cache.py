"""The scheduler with the prefix cache (issue 15): outputs and logprobs equal those without it
on every verify layout; copies of a prompt are prefilled once; prompt logprobs are computed even
where the prompt is cached; retraction keeps its prefix cached."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
from cache_invariants import check_cache_invariants

from dpattn.config import RunnerConfig, SchedulerConfig
from dpattn.distributed.parallel_state import Layout, ParallelState
from dpattn.executor.model_runner import ModelRunner
from dpattn.executor.sampling_params import SamplingParams
from dpattn.runtime.launch import run_ranks
from dpattn.scheduler.schedule_batch import Req
from dpattn.scheduler.scheduler import Scheduler

SYSTEM = list(range(40, 76))  # a 36-token shared "system prompt"
# (rid, prompt, arrival step, DP group key, prompt logprobs from)
WORKLOAD = [
    ("a", SYSTEM + [5, 6, 7], 0, 0, -1),
    ("b", SYSTEM + [9, 9], 0, 1, -1),
    ("c", SYSTEM + [5, 6, 8, 10], 6, 0, -1),
    ("d", SYSTEM + [9, 9], 6, 1, -1),  # b's whole prompt
    ("e", SYSTEM + [11], 7, 0, 3),  # prompt logprobs from position 3: inside the cached part
    ("f", [300, 301], 8, 1, -1),
]


def _drive(
    ps: ParallelState,
    model: str,
    cache: bool,
    kv_pool_tokens: int = 512,
    runner_kw: dict[str, Any] | None = None,
    **kw: Any,
) -> dict[str, Any]:
    runner = ModelRunner(
        RunnerConfig(model, kv_pool_tokens=kv_pool_tokens, **(runner_kw or {})), ps
    )
    cfg = SchedulerConfig(chunked_prefill_size=16, disable_radix_cache=not cache, **kw)
    sched = Scheduler(runner, cfg, set())
    out: dict[str, dict[str, Any]] = {}
    computed = 0  # prompt tokens run through the model
    for step in range(300):
        for rid, ids, arrival, key, start in WORKLOAD:
            if arrival == step and key % ps.dp_size == ps.dp_rank:
                params = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
                sched.add_request(Req(rid, ids, params, 0, True, start, 2 if start >= 0 else 0))
        sched.step()
        check_cache_invariants(sched)
        if sched.last_stats.forward_mode == "extend":
            computed += sched.last_stats.num_tokens
        for o in sched.take_outputs():
            r = out.setdefault(o.rid, {"ids": [], "lp": [], "in": [], "cached": 0})
            r["ids"] += o.new_ids
            r["lp"] += o.new_logprobs
            r["in"] += o.input_logprobs
            r["cached"] += o.cached_tokens
        busy = ps.world_cpu.all_gather_object(step < 10 or sched.has_work)
        if not any(busy):
            break
    sched.flush_cache()
    assert runner.kv_pool.available_size() == runner.kv_pool.size, "KV slots leaked"
    return {"out": out, "computed": computed, "retractions": sched.num_retractions}


def _run(model: Path, tp: int, dp: int, cache: bool, **kw: Any) -> list[dict[str, Any]]:
    fn = functools.partial(_drive, model=str(model), cache=cache, **kw)
    return run_ranks(fn, Layout(tp, dp), backend="thread", timeout_s=60)


def _merged(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for r in runs:
        out.update(r["out"])
    return out


# verify's layouts: plain, expert parallel, the scattered dense layout
LAYOUTS = [
    (1, 1, {}),
    (2, 1, {}),
    (2, 2, {}),
    (4, 2, {"ep": True}),
    (2, 1, {"moe_dense_tp_size": 1}),
]


@pytest.mark.parametrize("tp,dp,runner_kw", LAYOUTS, ids=str)
def test_cache_on_equals_cache_off(
    all_models: dict[str, Path], tp: int, dp: int, runner_kw: dict[str, Any]
) -> None:
    model = all_models["qwen3_moe_mixed"]  # a dense layer (scattered layout) and a MoE one
    on = _merged(_run(model, tp, dp, True, runner_kw=runner_kw))
    off = _merged(_run(model, tp, dp, False, runner_kw=runner_kw))
    assert on.keys() == off.keys() == {w[0] for w in WORKLOAD}
    for rid in on:
        assert on[rid]["ids"] == off[rid]["ids"], rid
        assert on[rid]["lp"] == pytest.approx(off[rid]["lp"], abs=1e-4), rid
        assert on[rid]["in"] == pytest.approx(off[rid]["in"], abs=1e-4), rid
        assert off[rid]["cached"] == 0
    assert len(on["e"]["in"]) == len(SYSTEM) + 1 - 3  # every asked prompt logprob
    if dp == 1:  # every request shares the group, so later ones find the system prompt
        assert on["c"]["cached"] >= len(SYSTEM) and on["d"]["cached"] == len(SYSTEM) + 1
        assert on["e"]["cached"] == 2  # limited to where its prompt logprobs start
        assert on["f"]["cached"] == 0


def test_copies_of_a_prompt_are_prefilled_once(tiny_models: dict[str, Path]) -> None:
    prompt = SYSTEM + [1, 2, 3]

    def drive(ps: ParallelState, cache: bool) -> tuple[int, list[int], list[list[int]]]:
        runner = ModelRunner(RunnerConfig(str(tiny_models["llama"]), kv_pool_tokens=256), ps)
        sched = Scheduler(runner, SchedulerConfig(disable_radix_cache=not cache), set())
        params = SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True)
        for i in range(4):
            sched.add_request(Req(f"n{i}", list(prompt), params, 0))
        computed, cached, ids = 0, [0] * 4, [[] for _ in range(4)]
        while sched.has_work:
            sched.step()
            if sched.last_stats.forward_mode == "extend":
                computed += sched.last_stats.num_tokens
            for o in sched.take_outputs():
                i = int(o.rid[1:])
                cached[i] += o.cached_tokens
                ids[i] += o.new_ids
        return computed, cached, ids

    [(computed, cached, ids)] = run_ranks(lambda ps: drive(ps, True), Layout(1, 1), "thread")
    [(computed_off, _, ids_off)] = run_ranks(lambda ps: drive(ps, False), Layout(1, 1), "thread")
    assert computed == len(prompt) + 3 and computed_off == 4 * len(prompt)
    assert cached == [0] + [len(prompt) - 1] * 3
    assert ids == ids_off and all(x == ids[0] for x in ids)


def test_retraction_keeps_the_prefix_cached(tiny_models: dict[str, Path]) -> None:
    """A pool too small for every running request: retracted requests come back through the
    cache, and the outputs still equal an unconstrained run without it."""
    model = tiny_models["qwen3"]
    runs = _run(model, 1, 1, True, kv_pool_tokens=48, max_running_requests=4)
    assert runs[0]["retractions"] > 0
    small, big = _merged(runs), _merged(_run(model, 1, 1, False))
    assert {r: v["ids"] for r, v in small.items()} == {r: v["ids"] for r, v in big.items()}


def test_pages_of_two_tokens(tiny_models: dict[str, Path]) -> None:
    model = tiny_models["qwen3_moe"]
    on, off = _merged(_run(model, 2, 2, True, page_size=2)), _merged(_run(model, 2, 2, False))
    assert {r: v["ids"] for r, v in on.items()} == {r: v["ids"] for r, v in off.items()}
    assert on["d"]["cached"] == len(SYSTEM) and on["d"]["cached"] % 2 == 0  # whole pages only


def test_lpm_admits_the_longest_cached_prefix_first(tiny_models: dict[str, Path]) -> None:
    def drive(ps: ParallelState, policy: str) -> list[str]:
        runner = ModelRunner(RunnerConfig(str(tiny_models["llama"]), kv_pool_tokens=256), ps)
        cfg = SchedulerConfig(schedule_policy=policy, max_running_requests=1)
        sched = Scheduler(runner, cfg, set())
        params = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)
        sched.add_request(Req("warm", SYSTEM + [1], params, 0))
        while sched.has_work:
            sched.step()
        sched.take_outputs()
        for rid, ids in (
            ("none", [300, 301, 302]),
            ("short", SYSTEM[:4] + [9]),
            ("long", SYSTEM + [2]),
        ):
            sched.add_request(Req(rid, ids, params, 0))
        done = []
        while sched.has_work:
            sched.step()
            done += [o.rid for o in sched.take_outputs() if o.finish_reason]
        return done

    [fcfs] = run_ranks(lambda ps: drive(ps, "fcfs"), Layout(1, 1), "thread")
    [lpm] = run_ranks(lambda ps: drive(ps, "lpm"), Layout(1, 1), "thread")
    assert fcfs == ["none", "short", "long"] and lpm == ["long", "short", "none"]
