"""Findings of a review of the disaggregation path, each with the test that shows it: the aux
room check before the attention-TP consensus, the consensus's own check of the rooms it agrees
on, a PREBUILT batch that must join a forward but cannot, and the PREBUILT path at
attention-TP > 1 and at D == 1, step by step."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
from pd_driver import PrebuiltStep
from pd_harness import Spec, check_groups, merged, run_colocated, run_pd, workload
from test_pd_protocol import assert_same

import dpattn.scheduler.scheduler as scheduler_module
from dpattn.config import RunnerConfig, SchedulerConfig
from dpattn.disaggregation.states import GroupDivergence, KVPoll, consensus
from dpattn.distributed.parallel_state import Layout, ParallelState
from dpattn.executor.forward_batch import ForwardMode
from dpattn.executor.model_runner import ModelRunner
from dpattn.runtime.launch import run_ranks
from dpattn.scheduler.mlp_sync import SyncDecision, batch_to_run
from dpattn.scheduler.schedule_batch import ScheduleBatch
from dpattn.scheduler.scheduler import Scheduler


class WrongAux:
    """The real zmq transfer, but on attention-TP rank 1 the aux data of room `room` says it
    belongs to another room (what a crossed channel would deliver)."""

    def __init__(self, ps: ParallelState, inner: Any, room: int) -> None:
        self.ps, self.inner, self.room = ps, inner, room

    def poll(self, rooms: list[int]) -> list[KVPoll]:
        states = self.inner.poll(rooms)
        if self.ps.attn_tp_rank == 1 and self.room in rooms:
            if states[rooms.index(self.room)] is KVPoll.Success:
                recv = self.inner.receivers[self.room]
                for src, aux in recv.aux.items():
                    recv.aux[src] = dataclasses.replace(aux, room=self.room + 1)
        return states

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_aux_of_another_room_fails_the_request_on_every_rank(
    tiny_models: dict[str, Path],
) -> None:
    """Before: the rank with the wrong aux crashed (an assert in the zmq backend) or, checking
    after the ranks agreed, dropped the request its peer ran (queues diverged). Now the mismatch
    is a Failed before the consensus: both ranks drop it, saying why; the rest run on."""
    model = tiny_models["llama"]
    specs = workload(seed=7, n=4)
    bad = specs[1]

    def wrap(ps: ParallelState, inner: Any) -> WrongAux:
        return WrongAux(ps, inner, bad.room)

    p_runs, d_runs = run_pd(model, (1, 1), (2, 1), specs, wrap_decode=wrap)
    check_groups(d_runs, Layout(2, 1))  # identical queues on both ranks after every step
    check_groups(p_runs, Layout(1, 1))
    got = merged(d_runs)
    assert got[bad.rid].finish_reason == "abort"
    for run in d_runs:  # rank 0 saw nothing wrong itself: it tells its client rank 1's reason
        why = run.failures[bad.rid]
        assert f"aux data of room {bad.room + 1} arrived for room {bad.room}" in why
    rest = tuple(s for s in specs if s is not bad)
    assert_same(got, run_colocated(model, rest), rest)


def test_consensus_checks_counts_and_rooms_and_names_the_divergence() -> None:
    """Before: consensus took the states alone and assumed equal queues (unequal lengths failed
    inside the collective, crossed rooms were min-reduced into each other's states)."""
    W, T, S = KVPoll.WaitingForInput, KVPoll.Transferring, KVPoll.Success
    cases = {
        "agree": ([[7, 8, 9], [7, 8, 9]], [[S, T, S], [S, S, W]]),
        "count": ([[7, 8, 9], [7, 8]], [[S, S, S], [S, S]]),
        "rooms": ([[7, 8, 9], [7, 9, 8]], [[S, S, S], [S, S, S]]),
    }

    def fn(ps: ParallelState) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, (rooms, states) in cases.items():
            a = ps.attn_tp_rank
            try:
                out[name] = consensus(ps, rooms[a], states[a], "transfer")
            except GroupDivergence as e:
                out[name] = str(e)
        return out

    r0, r1 = run_ranks(fn, Layout(2, 1), backend="thread", timeout_s=30)
    assert r0["agree"] == r1["agree"] == [S, T, W]
    for name in ("count", "rooms"):
        assert r0[name] == r1[name], "the ranks must fail alike"
        assert isinstance(r0[name], str) and "DP group 0" in r0[name], r0[name]
    assert "rank 0: 3 rooms [7, 8, 9]; rank 1: 2 rooms [7, 8]" in r0["count"]
    assert "rank 0: 3 rooms [7, 8, 9]; rank 1: 3 rooms [7, 9, 8]" in r0["rooms"]


def test_a_prebuilt_batch_that_cannot_join_a_forward_is_an_error_naming_the_rank(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: a PREBUILT batch without an inner idle batch skipped a forward the ranks had
    agreed on, silently (its peers then waited in the MLP collectives until they timed out)."""
    forward = SyncDecision([3, 0], [3, 0], False, False, need_idle_batch=True)

    def broken_sync(ps: ParallelState, batch: Any, *args: Any) -> tuple[Any, SyncDecision]:
        return ScheduleBatch(ForwardMode.PREBUILT), forward  # rule 4 not applied

    monkeypatch.setattr(scheduler_module, "prepare_mlp_sync_batch", broken_sync)

    def fn(ps: ParallelState) -> str:
        runner = ModelRunner(RunnerConfig(str(tiny_models["llama"]), kv_pool_tokens=64), ps)
        sched = Scheduler(runner, SchedulerConfig(), eos_ids=set())
        with pytest.raises(RuntimeError) as err:
            sched.step()
        return str(err.value)

    [message] = run_ranks(fn, Layout(1, 1), backend="thread", timeout_s=30)
    assert message.startswith("rank 0:") and "PREBUILT batch has no inner idle" in message
    with pytest.raises(RuntimeError, match="rank 5: .* has no batch"):
        batch_to_run(None, forward, 5)
    assert batch_to_run(None, dataclasses.replace(forward, global_num_tokens=[0, 0]), 5) is None


def expected_rows(gnt: tuple[int, ...], a: int, mode: str) -> int:
    """B of a gather in `mode` (docs/design.md §4): every group padded to a multiple of A."""
    p = [math.ceil(n / a) * a for n in gnt]
    return len(p) * max(p) if mode == "max_len" else sum(p)


def late_specs(group: int) -> tuple[Spec, ...]:
    """A long request on decode group 0; three short ones on `group`, arriving at the decode
    server once the long one runs there (their PREBUILT steps overlap its decode steps)."""
    long = Spec("long", (5, 6, 7, 8), 40, room=1000, decode_group=0)
    late = tuple(
        Spec(f"late{i}", tuple(range(10 + i, 20 + i)), 3, room=2000 + i, arrival=1 + 2 * i,
             decode_group=group, after="long")
        for i in range(3)
    )  # fmt: skip
    return (long, *late)


def test_prebuilt_at_attention_tp_2_pads_its_inner_idle_batch(
    tiny_models: dict[str, Path],
) -> None:
    """Decode (4, 2): two groups of two ranks. Group 1's PREBUILT steps (its transfers agreed
    over its two ranks) run the inner idle batch alongside group 0's decode, padded like any
    rank of the step (a multiple of A per group), with the metadata on the inner batch;
    a PREBUILT step with no tokens anywhere runs nothing and carries the metadata itself."""
    model = tiny_models["llama"]
    specs = late_specs(group=1)
    kw = {"debug_lockstep": True}
    p_runs, d_runs = run_pd(model, (1, 1), (4, 2), specs, decode_kw=kw)
    check_groups(d_runs, Layout(4, 2))
    assert d_runs[2].prebuilt_steps == d_runs[3].prebuilt_steps  # one group, one sequence
    kinds = set()
    for run in d_runs:
        for step in run.prebuilt_steps:
            gnt = step.global_num_tokens
            assert gnt[run.dp_rank] == 0, "a PREBUILT batch counted tokens in the MLP sync"
            if max(gnt) > 0:
                kinds.add("overlap")
                assert (step.mode, step.idle, step.has_inner) == ("idle", True, True), step
                assert step.inner_meta == list(gnt) and step.own_meta is None, step
                assert step.padding_mode in ("max_len", "sum_len"), step
                assert step.padded_tokens == expected_rows(gnt, 2, step.padding_mode), step
            else:
                kinds.add("nothing")
                assert (step.mode, step.idle, step.has_inner) == ("none", False, False), step
                assert step.own_meta == [0, 0] and step.padded_tokens == 0, step
    assert kinds == {"overlap", "nothing"}, kinds
    assert_same(merged(d_runs), run_colocated(model, specs), specs)


def test_prebuilt_at_d1_writes_metadata_on_itself_and_runs_no_forward(
    tiny_models: dict[str, Path],
) -> None:
    """Decode (2, 1): D == 1, so no all-gather and no idle batch. Every PREBUILT step counts 0
    tokens, runs no forward (also while other requests are running: the step is the PREBUILT
    one) and carries the metadata on the PREBUILT batch itself (rule 5)."""
    model = tiny_models["llama"]
    specs = late_specs(group=0)
    kw = {"debug_lockstep": True}
    p_runs, d_runs = run_pd(model, (1, 1), (2, 1), specs, decode_kw=kw)
    check_groups(d_runs, Layout(2, 1))
    r0, r1 = d_runs
    assert r0.prebuilt_steps == r1.prebuilt_steps and len(r0.prebuilt_steps) >= 2
    for step in r0.prebuilt_steps:
        want = PrebuiltStep("none", False, (0,), 0, "", [0], None, False, step.running)
        assert step == want
    assert max(s.running for s in r0.prebuilt_steps) >= 2, "no PREBUILT step beside a decode"
    assert_same(merged(d_runs), run_colocated(model, specs), specs)
