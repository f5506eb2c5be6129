"""The scheduler over several ranks (thread backend, no ZMQ).

Every rank runs the same seeded workload: a request arrives at a given step in one DP group, and
every rank of that group adds its own copy of it. Checked: lock-step traces (world entries equal
on all ranks, attn_tp entries equal inside a group), outputs independent of the layout, chunked
prefill, retraction, aborts, and no KV slot leaks. The gloo Engine against the thread Engine is
in tests/entrypoints/test_engine_gloo.py; sampling alone in tests/executor/test_sampling_params.py.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpattn.config import RunnerConfig, SchedulerConfig
from dpattn.distributed.parallel_state import Layout, ParallelState
from dpattn.executor.model_runner import ModelRunner
from dpattn.executor.sampling_params import SamplingParams
from dpattn.runtime.launch import run_ranks
from dpattn.scheduler.mlp_sync import SyncRow
from dpattn.scheduler.schedule_batch import Req
from dpattn.scheduler.scheduler import Scheduler

SYNC_ROW = (1, len(SyncRow().as_list()))  # the MLP sync's all-gather: one row per rank

LAYOUTS = [(2, 1), (2, 2), (4, 2), (4, 4)]
BIG_POOL = 512  # never retracts on these workloads
MAX_STEPS = 400
LOGPROB_TOL = 1e-4
Trace = list[tuple[str, str, tuple[int, ...]]]


# ----------------------------------------------------------------------------- workload


@dataclass(frozen=True)
class Spec:
    """One request of a workload; every rank derives the same Req from it."""

    rid: str
    prompt: tuple[int, ...]
    max_new_tokens: int
    arrival: int
    group_key: int  # DP group = group_key % dp_size
    abort_at: int | None = None  # step at whose start abort_request is called (>= arrival)
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int = 0

    def group(self, dp_size: int) -> int:
        return self.group_key % dp_size

    def req(self) -> Req:
        params = SamplingParams(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            ignore_eos=True,
        )
        return Req(self.rid, list(self.prompt), params, self.seed, return_logprob=True)


def make_workload(
    seed: int,
    num_requests: int = 6,
    max_prompt: int = 20,
    max_new: int = 8,
    max_arrival: int = 6,
    abort_prob: float = 0.0,
    vocab: int = 512,
) -> tuple[Spec, ...]:
    rng = random.Random(seed)
    specs = []
    for i in range(num_requests):
        arrival = rng.randrange(max_arrival + 1)
        abort_at = arrival + rng.randrange(4) if rng.random() < abort_prob else None
        specs.append(
            Spec(
                rid=f"s{seed}-r{i}",
                prompt=tuple(rng.randrange(3, vocab) for _ in range(rng.randint(1, max_prompt))),
                max_new_tokens=rng.randint(1, max_new),
                arrival=arrival,
                group_key=rng.randrange(12),
                abort_at=abort_at,
                seed=rng.randrange(2**31),
            )
        )
    return tuple(specs)


def without_aborts(specs: tuple[Spec, ...]) -> tuple[Spec, ...]:
    return tuple(replace(s, abort_at=None) for s in specs)


# ----------------------------------------------------------------------------- driver


@dataclass
class Result:
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class RankRun:
    rank: int
    dp_rank: int
    traces: list[Trace]  # one per scheduler step
    outputs: dict[str, Result]  # the requests of this rank's DP group
    kv: tuple[int, int]  # (available after, initial)
    rows: tuple[int, int]
    retractions: int
    chunked_steps: int  # steps that ended with a prompt partly prefilled


def drive(
    ps: ParallelState,
    model: str,
    specs: tuple[Spec, ...],
    kv_pool_tokens: int = BIG_POOL,
    chunked_prefill_size: int = 8,
    max_running_requests: int = 8,
) -> RankRun:
    runner = ModelRunner(
        RunnerConfig(model, kv_pool_tokens=kv_pool_tokens, max_running_requests=16), ps
    )
    sched = Scheduler(
        runner,
        SchedulerConfig(
            chunked_prefill_size=chunked_prefill_size, max_running_requests=max_running_requests
        ),
        eos_ids=set(),
    )
    kv0, rows0 = runner.kv_pool.available_size(), runner.req_to_token.available_size()
    mine = [s for s in specs if s.group(ps.dp_size) == ps.dp_rank]
    last_event = max([s.arrival for s in specs] + [s.abort_at or 0 for s in specs])
    outputs: dict[str, Result] = {}
    traces: list[Trace] = []
    chunked_steps = 0
    ps.trace.take()  # model construction
    for step in range(MAX_STEPS):
        for s in mine:
            if s.arrival == step:
                sched.add_request(s.req())
                outputs[s.rid] = Result()
        for s in mine:
            if s.abort_at == step:
                sched.abort_request(s.rid)
        sched.step()
        traces.append(ps.trace.take())
        chunked_steps += sched.chunked is not None
        for o in sched.take_outputs():
            res = outputs[o.rid]
            assert res.finish_reason is None, f"{o.rid}: output after it finished"
            res.ids += o.new_ids
            res.logprobs += o.new_logprobs
            res.finish_reason = o.finish_reason
        if step >= last_event:  # harness only: stop once no rank has work left
            busy = ps.world_cpu.all_gather_object(sched.has_work)
            ps.trace.take()
            if not any(busy):
                break
    else:
        raise AssertionError(f"rank {ps.rank}: workload not finished in {MAX_STEPS} steps")
    sched.flush_cache()  # every cached prefix back: the pool must be whole again
    return RankRun(
        ps.rank,
        ps.dp_rank,
        traces,
        outputs,
        (runner.kv_pool.available_size(), kv0),
        (runner.req_to_token.available_size(), rows0),
        sched.num_retractions,
        chunked_steps,
    )


def run_workload(
    model: Path, tp: int, dp: int, specs: tuple[Spec, ...], **kw: Any
) -> list[RankRun]:
    def fn(ps: ParallelState) -> RankRun:
        return drive(ps, str(model), specs, **kw)

    runs = run_ranks(fn, Layout(tp, dp), backend="thread", timeout_s=60)
    check_lockstep(runs, Layout(tp, dp))
    for r in runs:
        assert r.kv[0] == r.kv[1], f"rank {r.rank}: KV slots leaked"
        assert r.rows[0] == r.rows[1], f"rank {r.rank}: req_to_token rows leaked"
    return runs


def check_lockstep(runs: list[RankRun], layout: Layout) -> None:
    steps = {len(r.traces) for r in runs}
    assert len(steps) == 1, f"ranks ran different numbers of steps: {steps}"
    for step in range(steps.pop()):
        world = [[c for c in r.traces[step] if c[0] == "world"] for r in runs]
        for r in runs:
            assert world[r.rank] == world[0], f"step {step}: rank {r.rank} world entries differ"
            lead = runs[r.dp_rank * layout.attn_tp_size]
            assert r.traces[step] == lead.traces[step], (
                f"step {step}: rank {r.rank} differs from its DP group leader {lead.rank}"
            )
            assert all(c[0] in ("world", f"attn_tp{r.dp_rank}") for c in r.traces[step])
    for r in runs:  # ranks of one group emit identical outputs (same tokens, bit-equal logprobs)
        lead = runs[r.dp_rank * layout.attn_tp_size]
        assert r.outputs == lead.outputs, f"rank {r.rank} outputs differ from its leader"


def merged(runs: list[RankRun]) -> dict[str, Result]:
    out: dict[str, Result] = {}
    for r in runs:
        out.update(r.outputs)
    return out


_BASELINES: dict[tuple[Any, ...], dict[str, Result]] = {}


def baseline(model: Path, specs: tuple[Spec, ...], **kw: Any) -> dict[str, Result]:
    """T = D = 1, no aborts, a pool that never retracts (cached per workload)."""
    key = (str(model), specs, tuple(sorted(kw.items())))
    if key not in _BASELINES:
        _BASELINES[key] = merged(run_workload(model, 1, 1, without_aborts(specs), **kw))
    return _BASELINES[key]


def assert_matches(got: dict[str, Result], ref: dict[str, Result], specs: tuple[Spec, ...]) -> None:
    """Outputs equal the reference; an aborted request's tokens are a prefix of it."""
    assert set(got) == {s.rid for s in specs}
    for s in specs:
        g, r = got[s.rid], ref[s.rid]
        assert r.finish_reason == "length" and len(r.ids) == s.max_new_tokens
        assert g.finish_reason is not None, f"{s.rid} never finished"
        if g.finish_reason == "abort":
            assert s.abort_at is not None
            assert g.ids == r.ids[: len(g.ids)], f"{s.rid}: tokens before the abort differ"
            assert len(g.ids) < s.max_new_tokens
        else:
            assert g.finish_reason == "length"
            assert g.ids == r.ids, f"{s.rid}: greedy tokens differ from the T=D=1 run"
        assert len(g.logprobs) == len(g.ids)
        torch.testing.assert_close(
            torch.tensor(g.logprobs),
            torch.tensor(r.logprobs[: len(g.ids)]),
            atol=LOGPROB_TOL,
            rtol=0,
        )
        if s.abort_at == s.arrival:  # aborted before its first step
            assert g.finish_reason == "abort" and g.ids == []


# ----------------------------------------------------------------------------- layouts

_BASE = make_workload(seed=7, num_requests=7)
CHUNK_WORKLOAD = (
    *_BASE[:4],
    replace(_BASE[4], abort_at=_BASE[4].arrival),  # aborted before its first step
    _BASE[5],
    replace(_BASE[6], abort_at=_BASE[6].arrival + 3),  # aborted mid-way: 2 tokens at most
)


@pytest.mark.parametrize("tp,dp", [(1, 1), *LAYOUTS])
def test_layouts_match_single_rank(tiny_models: dict[str, Path], tp: int, dp: int) -> None:
    """Greedy tokens and logprobs of every layout equal the T = D = 1 run; chunked prefill and
    aborts happen; traces are lock-step; pools are back to full."""
    model = tiny_models["llama"]
    specs = CHUNK_WORKLOAD
    assert any(len(s.prompt) > 8 for s in specs)  # more than one chunk
    runs = run_workload(model, tp, dp, specs)
    got = merged(runs)
    assert_matches(got, baseline(model, specs), specs)
    assert any(r.chunked_steps for r in runs), "chunked prefill not exercised"
    aborted = [rid for rid, res in got.items() if res.finish_reason == "abort"]
    assert len(aborted) >= 2
    if dp > 1:
        assert all(r.traces and r.traces[0][0] == ("world", "all_gather", SYNC_ROW) for r in runs)


@pytest.mark.parametrize("tp,dp", [(1, 1), (2, 2), (4, 2)])
def test_retraction_keeps_outputs(tiny_models: dict[str, Path], tp: int, dp: int) -> None:
    """A KV pool too small for all running requests: some are retracted and resumed later,
    with the same greedy tokens as an unconstrained run."""
    model = tiny_models["qwen3"]
    specs = make_workload(seed=3, num_requests=8, max_prompt=16, max_new=12, max_arrival=2)
    specs = tuple(replace(s, group_key=i % 2) for i, s in enumerate(specs))  # both groups busy
    runs = run_workload(model, tp, dp, specs, kv_pool_tokens=40, chunked_prefill_size=16)
    assert sum(r.retractions for r in runs) > 0, "no request was retracted"
    assert_matches(merged(runs), baseline(model, specs, chunked_prefill_size=16), specs)


def test_single_request_with_an_idle_group(tiny_models: dict[str, Path]) -> None:
    spec = Spec("only", (5, 9, 200, 31, 77), max_new_tokens=6, arrival=1, group_key=0)
    runs = run_workload(tiny_models["qwen3_moe"], 2, 2, (spec,))
    assert runs[0].outputs["only"].finish_reason == "length"
    assert len(runs[0].outputs["only"].ids) == 6
    assert runs[1].outputs == {}  # group 1 idle throughout, yet it joined every forward
    forward_steps = [t for t in runs[1].traces if len(t) > 1]
    assert len(forward_steps) == 1 + 6 - 1  # one prefill, five decodes
    assert_matches(merged(runs), baseline(tiny_models["qwen3_moe"], (spec,)), (spec,))


def test_prompt_longer_than_kv_pool_is_aborted(tiny_models: dict[str, Path]) -> None:
    """A prompt that can never fit the KV pool is aborted instead of holding it forever."""
    big = Spec("big", tuple(range(3, 33)), max_new_tokens=3, arrival=0, group_key=0)
    small = Spec("small", (4, 5, 6), max_new_tokens=3, arrival=1, group_key=0)
    runs = run_workload(tiny_models["llama"], 2, 2, (big, small), kv_pool_tokens=16)
    out = merged(runs)
    assert out["big"].finish_reason == "abort" and out["big"].ids == []
    assert out["small"].finish_reason == "length" and len(out["small"].ids) == 3


@pytest.mark.parametrize("tp,dp", [(1, 1), (2, 2)])
def test_retraction_does_not_abort_a_request_that_fits(
    tiny_models: dict[str, Path], tp: int, dp: int
) -> None:
    """A decodes while B's prompt is half prefilled and holds the rest of the pool: A must be
    retracted (B finishes, then A resumes), not aborted as if it could never fit."""
    a = Spec("a", tuple(range(10, 16)), max_new_tokens=8, arrival=0, group_key=0)
    b = Spec("b", tuple(range(20, 32)), max_new_tokens=2, arrival=1, group_key=0)
    model = tiny_models["llama"]
    runs = run_workload(model, tp, dp, (a, b), kv_pool_tokens=16, chunked_prefill_size=16)
    assert runs[0].retractions > 0
    assert_matches(merged(runs), baseline(model, (a, b)), (a, b))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 10**6),
    layout=st.sampled_from(LAYOUTS),
    small_pool=st.booleans(),
    chunk=st.sampled_from([4, 8, 32]),
)
def test_random_workloads(
    tiny_models: dict[str, Path], seed: int, layout: tuple[int, int], small_pool: bool, chunk: int
) -> None:
    model = tiny_models["llama"]
    specs = make_workload(seed, num_requests=5, max_new=6, abort_prob=0.3)
    pool = 48 if small_pool else BIG_POOL
    runs = run_workload(model, *layout, specs, kv_pool_tokens=pool, chunked_prefill_size=chunk)
    assert_matches(merged(runs), baseline(model, specs), specs)


def test_skip_all_gather_rejected_at_dp2(tiny_models: dict[str, Path]) -> None:
    def fn(ps: ParallelState) -> None:
        runner = ModelRunner(RunnerConfig(str(tiny_models["llama"]), kv_pool_tokens=16), ps)
        Scheduler(runner, SchedulerConfig(skip_all_gather=True), eos_ids=set())

    with pytest.raises(ValueError, match="skip_all_gather=True needs dp_size == 1"):
        run_ranks(fn, Layout(2, 2), backend="thread", timeout_s=20)


# ----------------------------------------------------------------------------- Hugging Face


def test_greedy_matches_transformers_generate(tiny_models: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    model = tiny_models["llama"]
    specs = tuple(
        Spec(f"hf{i}", s.prompt, max_new_tokens=8, arrival=0, group_key=i)
        for i, s in enumerate(make_workload(seed=11, num_requests=3))
    )
    got = merged(run_workload(model, 2, 2, specs))
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # the scheduler runs with ignore_eos
    for s in specs:
        with torch.inference_mode():
            out = hf.generate(torch.tensor([s.prompt]), do_sample=False, max_new_tokens=8)
        assert got[s.rid].ids == out[0, len(s.prompt) :].tolist(), s.rid


# ----------------------------------------------------------------------------- sampling


def test_seeded_sampling_is_layout_independent(tiny_models: dict[str, Path]) -> None:
    """Non-greedy, seeded: the same tokens at (1, 1), (2, 2) and (4, 2), and on both ranks of a
    group at (4, 2) (check_lockstep compares the ranks of each group)."""
    model = tiny_models["mixtral"]
    specs = tuple(
        replace(s, temperature=0.9, top_p=0.95, top_k=50)
        for s in make_workload(seed=5, num_requests=4, max_new=8)
    )
    single = merged(run_workload(model, 1, 1, specs))
    for tp, dp in [(2, 2), (4, 2)]:
        wide = merged(run_workload(model, tp, dp, specs))
        assert {rid: r.ids for rid, r in wide.items()} == {rid: r.ids for rid, r in single.items()}
    greedy = merged(run_workload(model, 1, 1, tuple(replace(s, temperature=0) for s in specs)))
    assert any(single[rid].ids != greedy[rid].ids for rid in single), "sampling was greedy"
