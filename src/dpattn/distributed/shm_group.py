"""World all-gathers of small int64 rows through shared memory, for ranks on one host.

The MLP sync all-gathers a few int64 per rank every step. Through gloo that is a chain of thread
hand-offs (caller, gloo worker, transport thread) per rank, whose wake-ups after a long wait (the
forward) cost 2-3x the bare collective with multi-ms tails (measured on 2 cores: 1.1-1.3 ms mean
in a step loop against 0.6 ms back to back). Here every rank writes its row into its slot of a
shared array; the rank that completes the set rings the others' doorbells (a FIFO each), and a
rank still waiting blocks on its own FIFO rather than polling. Only rows of at most WIDTH int64
take this path, only when every rank runs on this host; every other collective still goes
through the process group.
"""

from __future__ import annotations

import mmap
import os
import select
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dpattn.distributed.group import CollectiveError, TorchGroup, Trace

WIDTH = 16  # int64 per row: the MLP sync row (7), the lock-step probe (8), start-up figures
# With a core to spare (ranks < cores: the frontend has one too), a wait first polls busily,
# then with sched_yield, then blocks on its doorbell. Without one, polling takes the core from a
# rank still computing (2 cores, 2 ranks: 12% fewer tok/s than sleeping, measured): it blocks.
SPIN_S = 50e-6
YIELD_S = 2e-3
RECHECK_S = 0.02  # a blocked wait looks at the slots at least this often (backstop only)
LIVENESS_S = 0.5  # how often a long wait checks that the other ranks still exist


_FENCE = threading.Lock()
_yield = getattr(os, "sched_yield", lambda: time.sleep(0))


def _fence() -> None:
    """A full memory barrier (a mutex's lock and unlock imply one): orders the row's stores
    before the sequence number's on weakly ordered CPUs (ARM64), and the loads after it."""
    with _FENCE:
        pass


def _shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a dead child of the engine stays a zombie until reaped: dead all the same
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class Doorbell:
    """One FIFO per rank of the host: ring() writes a byte to every other rank's, wait() blocks
    until a byte is in this rank's (or the timeout) and drains it. A byte written after the
    drain stays for the next wait(), so no wake-up is lost."""

    def __init__(self, read_fd: int, peer_fds: list[int]) -> None:
        self.read_fd, self.peer_fds = read_fd, peer_fds

    def ring(self) -> None:
        for fd in self.peer_fds:
            try:
                os.write(fd, b"\0")
            except (BlockingIOError, BrokenPipeError):  # full: a wake-up is pending anyway;
                pass  # gone: the waiting rank's liveness check names it

    def wait(self, timeout_s: float) -> None:
        if select.select([self.read_fd], [], [], timeout_s)[0]:
            try:
                os.read(self.read_fd, 4096)
            except BlockingIOError:
                pass


class ShmSlots:
    """[2, world, 1 + WIDTH] int64 in a shared mapping; column 0 is the slot's sequence number.

    Two buffers by sequence parity: a rank can be at most one all-gather ahead of the slowest
    (the next one needs everybody's row), so it never overwrites a row still being read.
    """

    def __init__(
        self, buf: mmap.mmap, world: int, rank: int, timeout_s: float, doorbell: Doorbell
    ) -> None:
        self.buf, self.doorbell = buf, doorbell
        self.slots = np.ndarray((2, world, 1 + WIDTH), dtype=np.int64, buffer=buf)
        self.pids = np.ndarray((world,), dtype=np.int64, buffer=buf, offset=self.slots.nbytes)
        self.world, self.rank, self.timeout_s = world, rank, timeout_s
        self.seq = 0
        spare_core = world < (os.cpu_count() or 1)
        self.spin_s, self.yield_s = (SPIN_S, YIELD_S) if spare_core else (0.0, 0.0)

    @staticmethod
    def nbytes(world: int) -> int:
        return 2 * world * (1 + WIDTH) * 8 + world * 8

    def all_gather(self, row: np.ndarray) -> np.ndarray:
        """row: [k <= WIDTH] int64 -> [world, k], rank order."""
        k = row.shape[0]
        self.seq += 1
        buf = self.slots[self.seq % 2]
        buf[self.rank, 1 : 1 + k] = row
        _fence()
        buf[self.rank, 0] = self.seq  # published: the row is visible before it
        _fence()  # ...and before this rank reads the others' (two last arrivals both see all)
        seqs = buf[:, 0]
        if (seqs == self.seq).all():
            self.doorbell.ring()  # the last to arrive wakes the waiting ranks
        else:
            self._wait(seqs)
        _fence()
        return buf[:, 1 : 1 + k].copy()

    def _wait(self, seqs: np.ndarray) -> None:
        start = time.perf_counter()
        check = start + LIVENESS_S
        while not (seqs == self.seq).all():
            now = time.perf_counter()
            if now - start < self.spin_s:
                continue
            if now - start < self.yield_s:
                _yield()
                continue
            self.doorbell.wait(RECHECK_S)
            if now < check:
                continue
            check = now + LIVENESS_S
            missing = [r for r in range(self.world) if seqs[r] < self.seq]
            gone = [r for r in missing if not _alive(int(self.pids[r]))]
            if gone or now - start > self.timeout_s:
                why = f"ranks {gone} are gone" if gone else f"no row after {self.timeout_s:.0f} s"
                raise CollectiveError(
                    f"shared-memory all-gather #{self.seq}: waiting for ranks {missing}: {why}"
                )


def open_slots(pg: dist.ProcessGroup, ranks: list[int], rank: int, timeout_s: float) -> ShmSlots:
    """The group's first rank creates the mapping's file and every rank its FIFO; once all are
    open they are unlinked (nothing left behind, even after a crash). Gloo collectives at
    start-up only. `ranks` are the group's global ranks (one pipeline stage's, say); slots and
    FIFOs are indexed by the position in it."""
    world, rank = len(ranks), ranks.index(rank)
    path = [str(Path(_shm_dir()) / f"dpattn-sync-{uuid.uuid4().hex}")] if rank == 0 else [None]
    if rank == 0:
        with open(path[0], "wb") as f:
            f.truncate(ShmSlots.nbytes(world))
    dist.broadcast_object_list(path, src=ranks[0], group=pg)
    base = str(path[0])
    fifo = f"{base}-{rank}"
    os.mkfifo(fifo, 0o600)
    read_fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader first: writers may open
    dist.barrier(group=pg)
    peers = [os.open(f"{base}-{r}", os.O_WRONLY | os.O_NONBLOCK) for r in range(world) if r != rank]
    with open(base, "r+b") as f:
        buf = mmap.mmap(f.fileno(), ShmSlots.nbytes(world))
    slots = ShmSlots(buf, world, rank, timeout_s, Doorbell(read_fd, peers))
    slots.pids[rank] = os.getpid()
    dist.barrier(group=pg)
    os.unlink(fifo)
    if rank == 0:
        os.unlink(base)
    return slots


class ShmTorchGroup(TorchGroup):
    """A TorchGroup whose small int64 CPU all-gathers go through ShmSlots."""

    def __init__(
        self,
        name: str,
        ranks: list[int],
        rank: int,
        trace: Trace,
        pg: dist.ProcessGroup,
        slots: ShmSlots,
        label: str | None = None,
    ) -> None:
        super().__init__(name, ranks, rank, trace, pg, label)
        self.slots = slots

    def _all_gather(self, t: torch.Tensor) -> torch.Tensor:
        row = t.dtype == torch.int64 and t.device.type == "cpu" and t.dim() == 2
        if not row or t.shape[0] != 1 or t.shape[1] > WIDTH:
            return super()._all_gather(t)
        return torch.from_numpy(self.slots.all_gather(t[0].numpy()))

    def pg_all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """The same all-gather through the process group (the bench's floor for comparison)."""
        return super()._all_gather(t)
