"""gather -> MLP -> scatter round trips on the thread backend (docs/design.md §4, §5, §7)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpattn.distributed.group import CollectiveError
from dpattn.distributed.parallel_state import Layout, thread_parallel_state
from dpattn.distributed.thread_backend import ThreadWorld, run_threads
from dpattn.layers.dp_attention import (
    GatherPlan,
    PaddingMode,
    attn_tp_gather,
    attn_tp_scatter,
    dp_gather,
    dp_scatter,
)

H = 8


def _round_trip(t: int, d: int, counts: list[int], mode: str) -> None:
    layout = Layout(t, d)
    a = layout.attn_tp_size
    gen = torch.Generator().manual_seed(sum(counts) + 31 * t + d)
    residual = [torch.randn(n, H, generator=gen) for n in counts]
    partial = [torch.randn(counts[layout.dp_rank(r)], H, generator=gen) for r in range(t)]
    plan0 = GatherPlan.build(counts, a, override=mode)
    mlp = [torch.randn(plan0.total, H, generator=gen) for _ in range(t)]
    mlp_sum = torch.stack(mlp).sum(0)
    world = ThreadWorld(t, timeout=10)

    def rank_fn(r: int) -> None:
        ps = thread_parallel_state(world, layout, r)
        g = ps.dp_rank
        plan = GatherPlan.build(counts, a, override=mode)
        assert all(p % a == 0 for p in plan.padded)
        assert plan.total == (
            d * max(plan.padded) if plan.mode is PaddingMode.MAX_LEN else sum(plan.padded)
        )
        hidden = dp_gather(ps, plan, partial[r], residual[g])
        assert hidden.shape == (plan.total, H)
        group_partials = sum(partial[q] for q in layout.attn_tp_ranks(g))
        expect = residual[g] + group_partials
        for dd in range(d):
            s, n = plan.starts[dd], counts[dd]
            exp_dd = residual[dd] + sum(partial[q] for q in layout.attn_tp_ranks(dd))
            torch.testing.assert_close(hidden[s : s + n], exp_dd, rtol=1e-5, atol=1e-5)
            # padding rows stay zero
            assert torch.all(hidden[s + n : s + plan.lens[dd]] == 0)
        out = dp_scatter(ps, plan, mlp[r], hidden)
        s = plan.starts[g]
        torch.testing.assert_close(out, expect + mlp_sum[s : s + counts[g]], rtol=1e-5, atol=1e-5)
        # identity MLP: the local rows come back exactly
        zeros = torch.zeros_like(hidden)
        back = dp_scatter(
            ps, plan, zeros, dp_gather(ps, plan, torch.zeros_like(residual[g]), residual[g])
        )
        assert torch.equal(back, residual[g])
        # scattered MLP layout
        chunk = attn_tp_scatter(ps, plan, partial[r], residual[g])
        assert chunk.shape[0] == plan.padded[g] // a
        torch.testing.assert_close(attn_tp_gather(ps, plan, chunk), expect, rtol=1e-5, atol=1e-5)

    run_threads(world, rank_fn)


@pytest.mark.parametrize("t,d", [(1, 1), (2, 1), (2, 2), (4, 1), (4, 2), (4, 4), (8, 2), (8, 4)])
@pytest.mark.parametrize("mode", ["max_len", "sum_len"])
def test_round_trip_with_idle_group(t: int, d: int, mode: str) -> None:
    counts = [0] + [3 + 2 * i for i in range(d - 1)] if d > 1 else [5]
    _round_trip(t, d, counts, mode)


@settings(max_examples=60, deadline=None)
@given(
    layout=st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 1), (4, 2), (4, 4)]),
    data=st.data(),
    mode=st.sampled_from(["max_len", "sum_len", "auto"]),
)
def test_round_trip_random_counts(layout: tuple[int, int], data: st.DataObject, mode: str) -> None:
    t, d = layout
    counts = data.draw(st.lists(st.integers(0, 9), min_size=d, max_size=d))
    _round_trip(t, d, counts, mode)


def test_padding_mode_rule() -> None:
    # any group extending at D > 1 => SUM_LEN
    assert GatherPlan.build([4, 4], 1, is_extend_in_batch=True).mode is PaddingMode.SUM_LEN
    # balanced decode => MAX_LEN; one heavy group among many idle ones => SUM_LEN
    assert GatherPlan.build([4, 4, 4, 4], 2).mode is PaddingMode.MAX_LEN
    assert GatherPlan.build([16, 0, 0, 0, 0], 1).mode is PaddingMode.SUM_LEN
    assert GatherPlan.build([16, 0, 0, 0, 0], 1, graph=True).mode is PaddingMode.MAX_LEN
    # D == 1 with A == 2 and an odd count pads to the next multiple of A
    plan = GatherPlan.build([3], 2)
    assert plan.padded == (4,) and plan.total == 4


def test_thread_backend_names_divergent_ops() -> None:
    world = ThreadWorld(2, timeout=10)
    layout = Layout(2, 1)

    def rank_fn(r: int) -> None:
        ps = thread_parallel_state(world, layout, r)
        if r == 0:
            ps.world.all_reduce(torch.zeros(3))
        else:
            ps.world.all_gather(torch.zeros(4))

    with pytest.raises(CollectiveError, match=r"rank 0: all_reduce\[3\].*rank 1: all_gather\[4\]"):
        run_threads(world, rank_fn)


def test_thread_backend_detects_cross_group_deadlock() -> None:
    world = ThreadWorld(4, timeout=30)
    layout = Layout(4, 2)

    def rank_fn(r: int) -> None:
        ps = thread_parallel_state(world, layout, r)
        if r == 3:  # takes a different branch: waits in its attn_tp group, others in world
            ps.attn_tp.all_reduce(torch.zeros(2))
        else:
            ps.world.all_reduce(torch.zeros(2))

    with pytest.raises(CollectiveError, match="rank 3 waits in attn_tp1.all_reduce"):
        run_threads(world, rank_fn)
