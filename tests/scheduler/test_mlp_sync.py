"""The MLP sync (docs/design.md §3): the pure decision, and `prepare_mlp_sync_batch` on the thread backend.

Expected values are recomputed here from the rules of docs/design.md §3, independently of `dpattn.scheduler.mlp_sync`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from dpattn.config import RunnerConfig
from dpattn.distributed.parallel_state import Layout, ParallelState
from dpattn.executor.forward_batch import ForwardMode
from dpattn.executor.model_runner import ModelRunner
from dpattn.executor.sampling_params import SamplingParams
from dpattn.runtime.launch import run_ranks
from dpattn.scheduler.mlp_sync import (
    SyncDecision,
    SyncRow,
    decide,
    local_row,
    prepare_mlp_sync_batch,
)
from dpattn.scheduler.schedule_batch import Req, ScheduleBatch
from dpattn.tools.verify import reference_logits

ROW_SHAPE = (1, len(SyncRow().as_list()))
SYNC_ALL_GATHER = ("world", "all_gather", ROW_SHAPE)

# kind -> (num_tokens n, num_tokens_for_logprob m, is_extend) of the batch `make_batch` builds
KINDS: dict[str, tuple[int, int, bool]] = {
    "none": (0, 0, False),
    "idle": (0, 0, False),
    "decode": (3, 3, False),
    "extend": (7, 2, True),
    "mixed": (5, 2, True),
    "prebuilt": (0, 0, False),
}


def fake_req(rid: str, n: int) -> Req:
    return Req(rid, list(range(3, 3 + n)), SamplingParams(temperature=0), seed=0)


def make_batch(kind: str, tokens: int | None = None) -> ScheduleBatch | None:
    """A fresh batch of the given kind (each rank builds its own objects)."""
    if kind == "none":
        return None
    if kind == "idle":
        return ScheduleBatch.idle()
    if kind == "prebuilt":
        return ScheduleBatch(ForwardMode.PREBUILT, reqs=[fake_req("p0", 4)])
    n = tokens if tokens is not None else KINDS[kind][0]
    if kind == "decode":  # one token per request; static shape, so it votes for graph replay
        reqs = [fake_req(f"d{i}", 5) for i in range(n)]
        return ScheduleBatch(
            ForwardMode.DECODE,
            reqs=reqs,
            input_ids=[7] * n,
            sample_mask=[True] * n,
            can_run_graph=True,
        )
    mode = ForwardMode.EXTEND if kind == "extend" else ForwardMode.MIXED
    reqs = [fake_req("e0", n - 1), fake_req("e1", 1)]  # two requests share the n tokens
    return ScheduleBatch(mode, reqs=reqs, input_ids=[9] * n, sample_mask=[True, True])


# ----------------------------------------------------------------------------- local row


@pytest.mark.parametrize("kind", list(KINDS))
def test_local_row(kind: str) -> None:
    n, m, ext = KINDS[kind]
    batch = make_batch(kind)
    row = local_row(batch, shutdown=kind == "idle")
    assert (row.num_tokens, row.num_tokens_for_logprob, row.is_extend) == (n, m, ext)
    assert row.can_run_graph == (kind == "decode")
    assert row.forward_mode == (0 if batch is None else int(batch.forward_mode))
    assert row.shutdown == (kind == "idle")
    assert len(row.as_list()) == ROW_SHAPE[1]


# ----------------------------------------------------------------------------- pure decision


def row(n: int = 0, m: int = 0, graph: bool = False, ext: bool = False, mode: int = 0) -> SyncRow:
    return SyncRow(n, m, graph, ext, mode)


DECODE, EXTEND, IDLE = int(ForwardMode.DECODE), int(ForwardMode.EXTEND), int(ForwardMode.IDLE)
PREBUILT = int(ForwardMode.PREBUILT)

# rows (one per DP group leader, or the local row alone when skipped), D, skip ->
#   global_num_tokens, ..._for_logprob, can_run_graph, is_extend, need_idle, run_forward
DECIDE_CASES: list[tuple[str, list[SyncRow], int, bool, tuple[Any, ...]]] = [
    ("D1 empty", [row()], 1, True, ([0], [0], False, False, False, False)),
    ("D1 decode", [row(3, 3, True, mode=DECODE)], 1, True, ([3], [3], True, False, False, True)),
    ("D1 extend", [row(7, 2, ext=True, mode=EXTEND)], 1, True, ([7], [2], False, True, False, True)),
    ("D1 prebuilt", [row(mode=PREBUILT)], 1, True, ([0], [0], False, False, False, False)),
    ("D1 gathered", [row(3, 3, True, mode=DECODE)], 1, False, ([3], [3], True, False, True, True)),
    ("D1 gathered empty", [row(mode=IDLE)], 1, False, ([0], [0], False, False, False, False)),
    ("D2 all empty", [row(), row()], 2, False, ([0, 0], [0, 0], False, False, False, False)),
    (
        "D2 one decodes",
        [row(2, 2, True, mode=DECODE), row()],
        2, False, ([2, 0], [2, 0], False, False, True, True),
    ),
    (
        "D2 both decode",
        [row(2, 2, True, mode=DECODE), row(5, 5, True, mode=DECODE)],
        2, False, ([2, 5], [2, 5], True, False, True, True),
    ),
    (
        "D4 mixed loads",
        [row(7, 2, ext=True, mode=EXTEND), row(1, 1, True, mode=DECODE), row(), row(mode=PREBUILT)],
        4, False, ([7, 1, 0, 0], [2, 1, 0, 0], False, True, True, True),
    ),
    ("D2 skipped, idle", [row(mode=IDLE)], 2, True, ([0], [0], False, False, True, True)),
    ("D4 skipped, busy", [row(3, 3, mode=DECODE)], 4, True, ([3], [3], False, False, True, True)),
]  # fmt: skip


@pytest.mark.parametrize(
    "rows,dp,skip,expected", [c[1:] for c in DECIDE_CASES], ids=[c[0] for c in DECIDE_CASES]
)
def test_decide(rows: list[SyncRow], dp: int, skip: bool, expected: tuple[Any, ...]) -> None:
    d = decide(rows, dp, skip)
    got = (
        d.global_num_tokens,
        d.global_num_tokens_for_logprob,
        d.can_run_graph,
        d.is_extend_in_batch,
        d.need_idle_batch,
        d.run_forward,
    )
    assert got == expected
    assert d.extending_groups == sum(r.is_extend for r in rows)
    assert d.shutdown is False
    # Rule 6: no forward when every group is empty, unless the skipped all-gather forces one.
    assert d.run_forward == (max(d.global_num_tokens) > 0 or (skip and dp > 1))


def test_decide_shutdown_rides_along() -> None:
    rows = [row(), SyncRow(shutdown=True), row(2, 2, mode=DECODE)]
    assert decide(rows, 3, False).shutdown
    assert not decide([row(), row()], 2, False).shutdown


# ----------------------------------------------------------------------------- over the ranks


@dataclass
class RankSync:
    """What one rank saw in one MLP sync step."""

    kind: str
    local: ScheduleBatch | None
    out: ScheduleBatch | None
    decision: SyncDecision
    trace: list[tuple[str, str, tuple[int, ...]]]


def group_kind(d: int, subject: str, others: str) -> str:
    """Group 0 holds the subject batch; with others == "busy" the odd groups decode."""
    if d == 0:
        return subject
    return "decode" if others == "busy" and d % 2 == 1 else "none"


def group_tokens(d: int, subject: str, others: str) -> tuple[int, int, bool, bool]:
    """(n, m, is_extend, can_run_graph) of group d's row."""
    kind = group_kind(d, subject, others)
    if d > 0 and kind == "decode":
        return d + 1, d + 1, False, True
    n, m, ext = KINDS[kind]
    return n, m, ext, kind == "decode"


def sync_once(
    layout: Layout, subject: str, others: str, skip: bool | None, steps: int = 1
) -> list[list[RankSync]]:
    def fn(ps: ParallelState) -> list[RankSync]:
        ps.trace.take()
        seen = []
        for _ in range(steps):
            kind = group_kind(ps.dp_rank, subject, others)
            local = make_batch(kind, ps.dp_rank + 1 if ps.dp_rank > 0 else None)
            out, decision = prepare_mlp_sync_batch(ps, local, skip)
            seen.append(RankSync(kind, local, out, decision, ps.trace.take()))
        return seen

    return run_ranks(fn, layout, backend="thread", timeout_s=20)


LAYOUTS = [(1, 1), (2, 1), (2, 2), (4, 2), (4, 4)]
SYNC_CASES = [
    (tp, dp, subject, others, skip)
    for (tp, dp), subject, others, skip in itertools.product(
        LAYOUTS, KINDS, ["empty", "busy"], [None, True, False]
    )
    if not (dp == 1 and others == "busy")  # D == 1: there are no other groups
]


def check_metadata(batch: ScheduleBatch, d: SyncDecision) -> None:
    assert batch.global_num_tokens == d.global_num_tokens
    assert batch.global_num_tokens_for_logprob == d.global_num_tokens_for_logprob
    assert batch.is_extend_in_batch == d.is_extend_in_batch
    assert batch.can_run_graph == d.can_run_graph


@pytest.mark.parametrize("tp,dp,subject,others,skip", SYNC_CASES)
def test_prepare_mlp_sync_batch(
    tp: int, dp: int, subject: str, others: str, skip: bool | None
) -> None:
    layout = Layout(tp, dp)
    results = [steps[0] for steps in sync_once(layout, subject, others, skip)]
    skipped = dp == 1 if skip is None else skip
    rows = {d: group_tokens(d, subject, others) for d in range(dp)}
    for r, res in enumerate(results):
        g = layout.dp_rank(r)
        view = [g] if skipped else list(range(dp))  # skipped: the local row alone (rule 1)
        gnt = [rows[d][0] for d in view]
        need_idle = dp > 1 if skipped else max(gnt) > 0  # rule 3
        dec = res.decision
        assert dec.global_num_tokens == gnt
        assert dec.global_num_tokens_for_logprob == [rows[d][1] for d in view]
        assert dec.is_extend_in_batch == any(rows[d][2] for d in view)
        assert dec.can_run_graph == all(rows[d][3] for d in view)
        assert dec.need_idle_batch == need_idle
        assert dec.run_forward == (max(gnt) > 0 or (skipped and dp > 1))
        # One all-gather of the row over world when not skipped, nothing else, ever.
        assert res.trace == ([] if skipped else [SYNC_ALL_GATHER]), f"rank {r}"

        # Rule 4 and rule 5.
        if res.kind == "none":
            if need_idle:
                assert res.out is not None and res.out.forward_mode is ForwardMode.IDLE
                check_metadata(res.out, dec)
            else:
                assert res.out is None
        elif res.kind == "prebuilt":
            assert res.out is res.local
            inner = res.out.inner_idle_batch
            if need_idle:  # the inner idle batch runs the collectives and carries the metadata
                assert inner is not None and inner.forward_mode is ForwardMode.IDLE
                check_metadata(inner, dec)
                assert res.out.global_num_tokens is None
            else:
                assert inner is None
                check_metadata(res.out, dec)
        else:
            assert res.out is res.local and res.out is not None
            assert res.out.inner_idle_batch is None
            check_metadata(res.out, dec)  # also at D == 1 with no idle batch (rule 5)

    # A forward runs on some rank <=> it runs on every rank, and then every rank has a batch
    # that joins the collectives.
    forwards = {res.decision.run_forward for res in results}
    assert len(forwards) == 1, "ranks disagree on running a forward"
    if forwards.pop():
        for res in results:
            assert res.out is not None
            run = res.out.inner_idle_batch if res.kind == "prebuilt" else res.out
            assert run is not None and run.global_num_tokens is not None
    if all(rows[d][0] == 0 for d in range(dp)) and not (skipped and dp > 1):
        assert not any(res.decision.run_forward for res in results)
        assert all(res.out is None or res.kind != "none" for res in results)
    if not skipped:  # gathered: every rank took the identical decision
        assert all(res.decision == results[0].decision for res in results)


@pytest.mark.parametrize("tp,dp", [(2, 2), (4, 2), (4, 4), (2, 1), (4, 1)])
def test_one_sync_collective_per_step(tp: int, dp: int) -> None:
    """Several steps: exactly one world all-gather per step at D > 1, none at D == 1."""
    for seen in sync_once(Layout(tp, dp), "extend", "busy", None, steps=4):
        for res in seen:
            assert res.trace == ([SYNC_ALL_GATHER] if dp > 1 else [])


# ----------------------------------------------------------------------------- D == 1 padding


@pytest.mark.parametrize("dense_tp", [None, 1])
def test_dp1_attn_tp_padding_without_all_gather(
    tiny_models: dict[str, Path], dense_tp: int | None
) -> None:
    """T = 2, D = 1 and 3 tokens: no all-gather and no idle batch, but the metadata makes the
    runner pad to 4 (A = 2), which the scattered dense MLP (moe_dense_tp_size=1) needs."""
    tokens = [5, 17, 42]
    model = tiny_models["llama"]

    def fn(ps: ParallelState) -> tuple[Any, ...]:
        runner = ModelRunner(
            RunnerConfig(str(model), kv_pool_tokens=16, moe_dense_tp_size=dense_tp), ps
        )
        req = Req("r", tokens, SamplingParams(temperature=0), seed=0)
        req.row, req.extend_len = runner.req_to_token.alloc(), len(tokens)
        slots = runner.kv_pool.alloc(len(tokens))
        assert req.row is not None and slots is not None
        runner.req_to_token.table[req.row, : len(tokens)] = slots
        batch = ScheduleBatch(
            ForwardMode.EXTEND,
            reqs=[req],
            input_ids=list(tokens),
            positions=list(range(len(tokens))),
            out_cache_loc=slots,
            sample_mask=[True],
        )
        ps.trace.take()
        out, decision = prepare_mlp_sync_batch(ps, batch)
        sync_trace = ps.trace.take()
        fb = out.to_forward_batch() if out is not None else None
        assert fb is not None
        plan = runner.gather_plan(fb)
        logits = runner.forward(fb, plan)
        return out is batch, decision, sync_trace, plan, logits

    results = run_ranks(fn, Layout(2, 1), backend="thread", timeout_s=30)
    ref = reference_logits(str(model), "float32", {0: tokens})[0][-1]
    for same, decision, sync_trace, plan, logits in results:
        assert same, "no idle batch at D == 1"
        assert not decision.need_idle_batch
        assert sync_trace == []
        assert plan.global_num_tokens == (3,) and plan.padded == (4,) and plan.total == 4
        torch.testing.assert_close(logits[0], ref, atol=1e-4, rtol=0)
