"""In-process group backend: every rank is a thread, collectives meet at a shared rendezvous.

Fast and deterministic (sums are taken in rank order). Unlike NCCL or gloo it never hangs on
a protocol bug: at every rendezvous it compares what each rank issued, and when every live
rank is blocked in collectives or pipeline receives that cannot complete, it reports each
rank's pending op. Pipeline sends go into per-(src, dst) mailboxes and never block, like the
process backends' queued sends.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from dpattn.distributed.group import CollectiveError, Group, Trace
from dpattn.distributed.layout import Layout
from dpattn.distributed.pipeline import Header, PipelineLink

Signature = tuple[Any, ...]


@dataclass
class _Rendezvous:
    name: str
    ranks: list[int]
    gen: int = 0
    arrived: int = 0
    slots: list[Any] = field(default_factory=list)
    result: list[Any] = field(default_factory=list)


class ThreadWorld:
    """Shared state of all rank threads of one in-process world."""

    def __init__(self, world_size: int, timeout: float = 60.0) -> None:
        self.world_size = world_size
        self.timeout = timeout
        self.cond = threading.Condition()
        self.rendezvous: dict[str, _Rendezvous] = {}
        self.pending: list[str | None] = [None] * world_size
        self.finished = [False] * world_size
        self.error: CollectiveError | None = None
        self.mailboxes: dict[tuple[int, int], deque[Any]] = {}  # (src, dst) -> messages
        self.receiving: dict[int, tuple[int, int]] = {}  # rank -> the mailbox it waits on

    def group(
        self, name: str, ranks: list[int], rank: int, trace: Trace, label: str | None = None
    ) -> ThreadGroup:
        """`label` tells apart groups of one role in different pipeline stages."""
        key = label or name
        with self.cond:
            rdv = self.rendezvous.setdefault(
                key, _Rendezvous(key, ranks, slots=[None] * len(ranks))
            )
        if rdv.ranks != ranks:
            raise ValueError(f"group {key}: ranks {ranks} differ from {rdv.ranks}")
        return ThreadGroup(self, rdv, rank, trace, name)

    def fail(self, error: CollectiveError) -> None:
        with self.cond:
            if self.error is None:
                self.error = error
            self.cond.notify_all()

    def mark_finished(self, rank: int) -> None:
        with self.cond:
            self.finished[rank] = True
            self.cond.notify_all()

    def _deadlock(self) -> str | None:
        """All live ranks blocked in collectives => nothing can complete. Describe them."""
        live = [r for r in range(self.world_size) if not self.finished[r]]
        if any(self.pending[r] is None for r in live):
            return None
        lines = [f"rank {r} waits in {self.pending[r]}" for r in live]
        done = [str(r) for r in range(self.world_size) if self.finished[r]]
        if done:
            lines.append(f"ranks {', '.join(done)} already left")
        return "; ".join(lines)

    def exchange(self, rdv: _Rendezvous, rank: int, sig: Signature, payload: Any) -> list[Any]:
        idx = rdv.ranks.index(rank)
        deadline = time.monotonic() + self.timeout
        with self.cond:
            if self.error is not None:
                raise self.error
            gen = rdv.gen
            rdv.slots[idx] = (sig, payload)
            rdv.arrived += 1
            self.pending[rank] = f"{rdv.name}.{sig[0]}{list(sig[1])}"
            if rdv.arrived == len(rdv.ranks):
                rdv.result, rdv.slots = rdv.slots, [None] * len(rdv.ranks)
                rdv.arrived, rdv.gen = 0, gen + 1
                for r in rdv.ranks:  # woken ranks are no longer blocked, even before they run
                    self.pending[r] = None
            self.cond.notify_all()  # completes the rendezvous, or lets waiters re-check for deadlock
            timed_out = f"rank {rank}: {self.pending[rank]} timed out after {self.timeout:.0f}s"
            self._block_until(lambda: rdv.gen != gen, deadline, timed_out)
            entries = rdv.result
        sigs = [e[0] for e in entries]
        if any(s != sigs[0] for s in sigs):
            desc = ", ".join(f"rank {r}: {s[0]}{list(s[1])}" for r, s in zip(rdv.ranks, sigs))
            err = CollectiveError(f"{rdv.name}: ranks issued different collectives ({desc})")
            self.fail(err)
            raise err
        return [e[1] for e in entries]

    def _block_until(self, done: Callable[[], bool], deadline: float, timed_out: str) -> None:
        """Wait (holding cond) until done(); fail the world on an error, deadlock or timeout."""
        while not done():
            if self.error is not None:
                raise self.error
            stuck = self._deadlock()
            if stuck is not None:
                self.error = CollectiveError(f"ranks diverged, no collective can complete: {stuck}")
                self.cond.notify_all()
                raise self.error
            left = deadline - time.monotonic()
            if left <= 0:
                self.error = CollectiveError(timed_out)
                self.cond.notify_all()
                raise self.error
            self.cond.wait(timeout=min(left, 1.0))

    def post(self, src: int, dst: int, message: Any) -> None:
        """A pipeline send: never blocks; wakes dst if it waits on this mailbox."""
        with self.cond:
            if self.error is not None:
                raise self.error
            self.mailboxes.setdefault((src, dst), deque()).append(message)
            if self.receiving.get(dst) == (src, dst):
                self.pending[dst] = None  # no longer blocked, even before it runs
            self.cond.notify_all()

    def take(self, src: int, dst: int, what: str, timeout_s: float | None = None) -> Any:
        """A pipeline receive: the oldest message from src, within the timeout."""
        timeout_s = self.timeout if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        with self.cond:
            if self.error is not None:
                raise self.error
            box = self.mailboxes.setdefault((src, dst), deque())
            if not box:
                self.receiving[dst], self.pending[dst] = (src, dst), what
                self.cond.notify_all()  # waiters re-check for deadlock
                try:
                    self._block_until(
                        lambda: bool(box), deadline, f"{what}: timed out after {timeout_s:g} s"
                    )
                finally:
                    del self.receiving[dst]
                    self.pending[dst] = None
            return box.popleft()


class ThreadGroup(Group):
    def __init__(
        self, world: ThreadWorld, rdv: _Rendezvous, rank: int, trace: Trace, name: str
    ) -> None:
        super().__init__(name, rdv.ranks, rank, trace, label=rdv.name)
        # Follow gloo's schedule (padding mode choice), so an in-process run is the same run.
        self.native_reduce_scatter = False
        self.world = world
        self.rdv = rdv
        self.rank = rank

    def _exchange(self, op: str, t: torch.Tensor | None, payload: Any, *extra: Any) -> list[Any]:
        sig = (
            op,
            tuple(t.shape) if t is not None else (),
            str(t.dtype) if t is not None else "",
            *extra,
        )
        return self.world.exchange(self.rdv, self.rank, sig, payload)

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        parts = self._exchange("all_reduce", t, t.clone())
        out = parts[0].clone()
        for p in parts[1:]:
            out += p
        return out

    def _all_gather(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cat(self._exchange("all_gather", t, t.clone()))

    def _reduce_scatter(self, t: torch.Tensor) -> torch.Tensor:
        n = t.shape[0] // self.size
        lo = self.rank_in_group * n
        parts = self._exchange("reduce_scatter", t, t.clone())
        out = parts[0][lo : lo + n].clone()
        for p in parts[1:]:
            out += p[lo : lo + n]
        return out

    def _broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        return self._exchange("broadcast", t, t.clone(), src)[src].clone()

    # Objects are deep-copied like a real transport would: ranks must never share state.
    def _all_gather_object(self, obj: Any) -> list[Any]:
        return copy.deepcopy(self._exchange("all_gather_object", None, obj))

    def _broadcast_object(self, obj: Any, src: int) -> Any:
        return copy.deepcopy(self._exchange("broadcast_object", None, obj, src)[src])


class ThreadLink(PipelineLink):
    """Pipeline messages through the world's mailboxes, copied like a real transport's."""

    def __init__(
        self, world: ThreadWorld, layout: Layout, rank: int, trace: Trace, device: torch.device
    ) -> None:
        super().__init__(layout, rank, trace, world.timeout, device)
        self.world = world

    def _post(self, dst: int, header: Header, values: list[torch.Tensor], what: str) -> None:
        self.world.post(self.rank, dst, (copy.deepcopy(header), [t.clone() for t in values]))

    def _take(self, src: int, what: str) -> tuple[Header, list[torch.Tensor]]:
        header, values = self.world.take(src, self.rank, what, self.timeout_s)
        return header, values

    def flush(self) -> None:
        pass  # a posted message is in the receiver's mailbox: nothing is in flight

    def _abort(self, error: CollectiveError) -> None:
        self.world.fail(error)


def run_threads(world: ThreadWorld, fn: Callable[[int], Any]) -> list[Any]:
    """Run fn(rank) on one thread per rank; return results in rank order.

    If any rank raises, the world fails so the others stop at their next collective, and the
    first original error (not a follow-on one) is re-raised here.
    """
    results: list[Any] = [None] * world.world_size
    errors: list[BaseException | None] = [None] * world.world_size

    def body(rank: int) -> None:
        try:
            results[rank] = fn(rank)
        except BaseException as e:  # noqa: BLE001 - reported to the caller below
            errors[rank] = e
            if not isinstance(e, CollectiveError):
                world.fail(CollectiveError(f"rank {rank} failed: {type(e).__name__}: {e}"))
        finally:
            world.mark_finished(rank)

    threads = [
        threading.Thread(target=body, args=(r,), name=f"rank{r}") for r in range(world.world_size)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    originals = [e for e in errors if e is not None and not isinstance(e, CollectiveError)]
    first = originals[0] if originals else next((e for e in errors if e is not None), None)
    if first is not None:
        first.dpattn_rank = errors.index(first)  # type: ignore[attr-defined]  # named by the engine
        raise first
    return results
