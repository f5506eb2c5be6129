"""The MLP sync's shared-memory all-gather (one host): same rows as gloo, in rank order, and it
fails with the waiting ranks named, never hangs, when a rank is gone or never arrives."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import time

import pytest
import torch

from dpattn.distributed.group import CollectiveError
from dpattn.distributed.parallel_state import Layout, ParallelState
from dpattn.distributed.shm_group import WIDTH, Doorbell, ShmSlots
from dpattn.runtime.launch import NodeSpec, RankGroup, run_ranks


def row(rank: int, i: int, width: int = 7) -> torch.Tensor:
    return torch.tensor([[rank * 1_000_003 + i * 7 + j for j in range(width)]], dtype=torch.int64)


def gather_many(ps: ParallelState) -> str:
    world = ps.layout.tp_size
    for i in range(300):  # parity buffers: a fast rank is never more than one gather ahead
        width = 1 + i % WIDTH
        got = ps.world_cpu.all_gather(row(ps.rank, i, width))
        assert torch.equal(got, torch.cat([row(r, i, width) for r in range(world)])), i
    # wider rows and other dtypes take the process group, with the same result
    wide = ps.world_cpu.all_gather(row(ps.rank, 0, WIDTH + 3))
    assert torch.equal(wide, torch.cat([row(r, 0, WIDTH + 3) for r in range(world)]))
    floats = ps.world_cpu.all_gather(torch.full((2, 3), float(ps.rank)))
    assert floats[:, 0].tolist() == [float(r) for r in range(world) for _ in range(2)]
    return type(ps.world_cpu).__name__


@pytest.mark.parametrize("tp,dp", [(2, 2), (4, 2)])
def test_shm_all_gather_equals_the_rows_in_rank_order(tp: int, dp: int) -> None:
    assert run_ranks(gather_many, Layout(tp, dp), backend="gloo") == ["ShmTorchGroup"] * tp


def test_without_shared_memory_the_process_group_gathers() -> None:
    group = RankGroup(gather_many, Layout(2, 2), "gloo", 60.0, NodeSpec(shm_sync=False))
    assert group.wait() == ["TorchGroup"] * 2


def slots(world: int, timeout_s: float, pids: list[int]) -> ShmSlots:
    nobody_rings = Doorbell(os.pipe()[0], [])
    s = ShmSlots(mmap.mmap(-1, ShmSlots.nbytes(world)), world, 0, timeout_s, nobody_rings)
    s.pids[:] = pids
    return s


def test_a_rank_that_never_arrives_times_out() -> None:
    s = slots(2, 0.3, [os.getpid(), os.getpid()])  # rank 1 alive but silent
    start = time.monotonic()
    with pytest.raises(CollectiveError, match=r"waiting for ranks \[1\].*no row after"):
        s.all_gather(row(0, 0)[0].numpy())
    assert time.monotonic() - start < 5


def test_a_dead_rank_is_noticed_before_the_timeout() -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    s = slots(3, 600.0, [os.getpid(), os.getpid(), dead.pid])
    s.slots[1, 1, 0] = 1  # rank 1 has arrived, rank 2 never will
    start = time.monotonic()
    with pytest.raises(CollectiveError, match=r"waiting for ranks \[2\].*ranks \[2\] are gone"):
        s.all_gather(row(0, 0)[0].numpy())
    assert time.monotonic() - start < 5


@pytest.mark.timeout(10)
def test_doorbell_wakes_once_per_ring_and_never_raises() -> None:
    """A ring is kept until the next wait, which drains it; a full or closed FIFO is no error
    (a wake-up is pending anyway, or the rank is gone and the liveness check names it)."""
    import select

    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    for fd in (r1, r2, w1, w2):
        os.set_blocking(fd, False)
    a, b = Doorbell(r1, [w2]), Doorbell(r2, [w1])
    a.ring()  # before b waits: not lost
    b.wait(60)  # returns at once (the test's timeout would fail it otherwise)
    assert select.select([r2], [], [], 0)[0] == []  # drained
    for _ in range(70_000):  # more than a pipe holds
        a.ring()
    os.close(r2)  # b's rank is gone
    a.ring()
