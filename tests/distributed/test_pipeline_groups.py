"""Pipeline stages' groups and the point-to-point link between them, on rank threads and on gloo
processes: each stage's world and attn_tp groups hold only its ranks, hidden states of changing
shapes arrive as sent (the ring from the last stage to stage 0 too), and a receive that waits
too long, or gets a message other than the one it expects, names the stage and the peer."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import pytest
import torch
import torch.distributed as dist
from pp_ranks import run_gloo

from dpattn.distributed.group import CollectiveError
from dpattn.distributed.layout import Layout
from dpattn.distributed.parallel_state import ParallelState, thread_parallel_state
from dpattn.distributed.pipeline import PipelineLink, channel
from dpattn.distributed.shm_group import ShmTorchGroup
from dpattn.distributed.thread_backend import ThreadWorld, run_threads

H = 8
T = TypeVar("T")
ROWS = [3, 0, 5, 1]  # tokens per step, an idle (zero-row) step among them


def on_threads(layout: Layout, fn: Callable[[ParallelState], T], timeout: float = 30.0) -> list[T]:
    world = ThreadWorld(layout.world_size, timeout=timeout)
    return run_threads(world, lambda g: fn(thread_parallel_state(world, layout, g)))


def activations(step: int, lane: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + lane)
    n = ROWS[step % len(ROWS)]
    return {
        "hidden_states": torch.randn(n, H, generator=gen),
        "residual": torch.randn(n, H, generator=gen).to(torch.bfloat16),
    }


def check_groups(ps: ParallelState) -> None:
    """The stage's groups: world = its T ranks, attn_tp = its DP group's A ranks."""
    layout, s = ps.layout, ps.pp_rank
    assert ps.global_rank == s * ps.tp_size + ps.rank and 0 <= ps.rank < ps.tp_size
    assert ps.world.ranks == layout.stage_ranks(s)
    assert ps.attn_tp.ranks == layout.attn_tp_ranks(ps.dp_rank, s)
    assert ps.world.name == "world" and ps.world.label == f"stage{s}.world"  # trace: the role
    assert ps.attn_tp.label == f"stage{s}.attn_tp{ps.dp_rank}"
    # an all-reduce in one stage sums only that stage's ranks
    got = ps.world.all_reduce(torch.tensor([float(ps.global_rank + 1)]))
    assert got.item() == sum(g + 1 for g in layout.stage_ranks(s))
    got = ps.attn_tp.all_reduce(torch.tensor([float(ps.global_rank + 1)]))
    assert got.item() == sum(g + 1 for g in layout.attn_tp_ranks(ps.dp_rank, s))
    # the MLP sync's all-gather (world_cpu): one row per rank of the stage, in rank order
    rows = ps.world_cpu.all_gather(torch.tensor([[ps.global_rank, s]], dtype=torch.int64))
    assert rows.tolist() == [[g, s] for g in layout.stage_ranks(s)]
    # across stages: the lane's collectives (a min over stages, stage 0's word for all)
    lane = layout.lane_ranks(ps.global_rank)
    assert ps.pp_group is not None and ps.pp_group.ranks == lane
    assert ps.pp_group.label == f"pp_group{ps.rank}"
    assert min(ps.pp_group.all_gather_object(100 - s)) == 100 - (ps.pp_size - 1)
    assert ps.pp_group.broadcast_object({"from": s}, src=0) == {"from": 0}


def pipeline_steps(ps: ParallelState, steps: int = 8) -> list[tuple[str, str, tuple[int, ...]]]:
    """Activations stage by stage, next-token ids from the last stage around to stage 0."""
    link = ps.pp
    assert link is not None and link.stage == ps.pp_rank
    lane = ps.rank
    for step in range(steps):
        if not link.is_first_stage:
            got = link.recv(tag=f"hidden {step}")
            want = activations(step, lane)
            assert isinstance(got, dict) and list(got) == list(want)
            for k in want:
                assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), (step, k)
        if not link.is_last_stage:
            link.send(activations(step, lane), tag=f"hidden {step}")
        else:  # the ring: the last stage's next stage is stage 0
            assert link.next_stage == 0
            link.send([torch.arange(ROWS[step % 4]) + 100 * step], tag=f"tokens {step}")
            link.send_object({"step": step, "lane": lane, "blob": "x" * 50 * step}, 0)
        if link.is_first_stage:
            (ids,) = link.recv(link.num_stages - 1, tag=f"tokens {step}")
            assert torch.equal(ids, torch.arange(ROWS[step % 4]) + 100 * step)
            meta = link.recv_object()  # from the previous stage: the last one, around the ring
            assert meta == {"step": step, "lane": lane, "blob": "x" * 50 * step}
    link.flush()
    return [c for c in ps.trace.take() if ">" in c[0]]  # the channels "pp<src>><dst>"


def check_traces(layout: Layout, traces: list[list[tuple[str, str, tuple[int, ...]]]]) -> None:
    """What a rank sent on a channel is what its peer received there, op for op."""
    for g, trace in enumerate(traces):
        for peer in layout.lane_ranks(g):
            if peer == g:
                continue
            chan = channel(layout.stage(g), layout.stage(peer))
            sent = [(op.replace("send", ""), shape) for c, op, shape in trace if c == chan]
            got = [(op.replace("recv", ""), shape) for c, op, shape in traces[peer] if c == chan]
            assert sent == got, (g, peer)


def stage_world(ps: ParallelState) -> list[tuple[str, str, tuple[int, ...]]]:
    check_groups(ps)
    ps.trace.take()
    return pipeline_steps(ps)


@pytest.mark.parametrize("pp,tp,dp", [(2, 1, 1), (2, 2, 1), (2, 2, 2), (3, 2, 1), (2, 4, 2)])
def test_stage_groups_and_links_on_threads(pp: int, tp: int, dp: int) -> None:
    layout = Layout(tp, dp, pp)
    traces = on_threads(layout, stage_world)
    check_traces(layout, traces)
    assert any(c[0] == channel(pp - 1, 0) for c in traces[(pp - 1) * tp])  # the ring was used


def gloo_world(ps: ParallelState) -> dict[str, object]:
    check_groups(ps)
    assert isinstance(ps.world_cpu, ShmTorchGroup)  # the MLP sync's fast path, per stage
    ps.trace.take()
    out: dict[str, object] = {"trace": pipeline_steps(ps)}
    link = ps.pp
    assert link is not None
    big = {"ids": list(range(400))}  # a header longer than one frame
    if link.is_first_stage:
        link.send_object(big)
        link.flush()
    else:
        assert link.recv_object() == big
        link.timeout_s = 1.0
        start = time.monotonic()
        with pytest.raises(CollectiveError) as e:
            link.recv()  # stage 0 sends nothing more, and stays alive below
        out.update(error=str(e.value), waited=time.monotonic() - start)
    # the default group is no stage's: all ranks leave together (a timeout closes only the
    # lane's connection)
    dist.barrier()
    return out


def test_stage_groups_and_links_on_gloo() -> None:
    layout = Layout(2, 1, 2)  # world 4: stages {0, 1} and {2, 3}
    out = run_gloo(gloo_world, layout, timeout_s=60.0)
    check_traces(layout, [o["trace"] for o in out])
    for g in (2, 3):
        peer = g - 2
        assert out[g]["error"] == (
            f"stage 1 rank {g}: recv from stage 0 rank {peer}: timed out after 1 s"
        )
        assert 0.9 < out[g]["waited"] < 5


def silent_stage_0(ps: ParallelState) -> None:
    link = ps.pp
    assert link is not None
    if link.is_first_stage:
        time.sleep(0.8)  # busy (not in a collective), so only the timeout can end the wait
    else:
        link.recv()


def test_thread_timeout_names_stage_and_peer() -> None:
    with pytest.raises(CollectiveError) as e:
        on_threads(Layout(2, 2, 2), silent_stage_0, timeout=0.3)
    assert str(e.value) in {
        f"stage 1 rank {g}: recv from stage 0 rank {g - 2}: timed out after 0.3 s" for g in (2, 3)
    }


def everyone_receives(ps: ParallelState) -> None:
    assert ps.pp is not None
    ps.pp.recv()


def test_thread_receives_that_cannot_complete_are_named_at_once() -> None:
    start = time.monotonic()
    with pytest.raises(CollectiveError, match="no collective can complete") as e:
        on_threads(Layout(1, 1, 2), everyone_receives, timeout=60)
    assert time.monotonic() - start < 10
    assert "rank 0 waits in stage 0 rank 0: recv from stage 1 rank 1" in str(e.value)
    assert "rank 1 waits in stage 1 rank 1: recv from stage 0 rank 0" in str(e.value)


def skip_differs(ps: ParallelState) -> None:
    """Stage 0 sends micro-batch 0's output, stage 1 skips it (a skip rule that differs)."""
    link: PipelineLink | None = ps.pp
    assert link is not None
    if link.is_first_stage:
        link.send([torch.zeros(2, H)], tag="out mb0")
        link.send([torch.zeros(2, H)], tag="out mb1")
    else:
        link.recv(tag="out mb1")


def kind_differs(ps: ParallelState) -> None:
    link = ps.pp
    assert link is not None
    if link.is_first_stage:
        link.send_object({"tokens": [1]})
    else:
        link.recv()


def test_a_message_other_than_the_expected_one_is_named() -> None:
    with pytest.raises(CollectiveError) as e:
        on_threads(Layout(1, 1, 2), skip_differs)
    assert str(e.value) == (
        "stage 1 rank 1: recv from stage 0 rank 0: expected tensors #0 'out mb1', "
        "the peer sent tensors #0 'out mb0'"
    )
    with pytest.raises(CollectiveError, match="expected tensors #0, the peer sent object #0"):
        on_threads(Layout(1, 1, 2), kind_differs)


def test_pp_size_1_leaves_the_parallel_state_as_before() -> None:
    world = ThreadWorld(2)
    states = [thread_parallel_state(world, Layout(2, 2), r) for r in range(2)]
    for r, ps in enumerate(states):
        assert (ps.rank, ps.global_rank, ps.pp_rank, ps.pp_size) == (r, r, 0, 1)
        assert ps.pp is None and ps.pp_group is None
        assert ps.is_first_stage and ps.is_last_stage
        assert ps.world.ranks == [0, 1] and ps.attn_tp.ranks == [r]
        assert ps.world.name == ps.world.label == "world"
        assert ps.attn_tp.name == ps.attn_tp.label == f"attn_tp{r}"
        assert ps.ranks_per_device == 2 and ps.world_cpu is ps.world
    assert set(world.rendezvous) == {"world", "attn_tp0", "attn_tp1"}
    with pytest.raises(ValueError, match="a world of 2 threads for 4 ranks"):
        thread_parallel_state(world, Layout(2, 2, 2), 0)
