"""Collective groups: one interface, a torch.distributed implementation and a trace.

Every collective goes through a `Group`, which records (group, op, shape) into the rank's
trace, so tests and the lock-step checker can compare what each rank issued. The trace holds the
group's role (`world`, `attn_tp<d>`), the same in every pipeline stage; messages use its `label`,
which names the stage when there are several (`stage1.world`).
"""

from __future__ import annotations

import pickle
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


class CollectiveError(RuntimeError):
    """A collective failed: ranks diverged, a peer died, or it timed out."""


@dataclass
class Trace:
    """The collectives one rank issued, in order: (group, op, shape) tuples."""

    calls: list[tuple[str, str, tuple[int, ...]]] = field(default_factory=list)

    def record(self, group: str, op: str, shape: tuple[int, ...]) -> None:
        self.calls.append((group, op, shape))

    def take(self) -> list[tuple[str, str, tuple[int, ...]]]:
        calls, self.calls = self.calls, []
        return calls


_OPS = (
    "all_reduce",
    "all_gather",
    "reduce_scatter",
    "broadcast",
    "all_gather_object",
    "broadcast_object",
)
_PROBE_DIMS = 4


class Group(ABC):
    """One rank's handle on a group of ranks. Tensors are split / concatenated on dim 0."""

    def __init__(
        self, name: str, ranks: list[int], rank: int, trace: Trace, label: str | None = None
    ) -> None:
        self.name = name
        self.label = label or name  # errors name the stage's group at pp_size > 1
        self.ranks = ranks
        self.size = len(ranks)
        self.rank_in_group = ranks.index(rank)
        self.trace = trace
        self.issued = 0  # collectives issued on this group so far
        self.lockstep = False  # --debug-lockstep: check every collective before running it
        self.probe_device = torch.device("cpu")
        # False where reduce-scatter is emulated by an all-reduce (gloo): the DP padding rule
        # then costs MAX_LEN with the collectives really run.
        self.native_reduce_scatter = True
        # Whether its collectives can be recorded in a CUDA graph (NCCL's can; a rendezvous of
        # threads or gloo's host round trips cannot).
        self.capturable = False

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        self._enter("all_reduce", t.shape)
        return t if self.size == 1 else self._all_reduce(t)

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        self._enter("all_gather", t.shape)
        return t if self.size == 1 else self._all_gather(t)

    def reduce_scatter(self, t: torch.Tensor) -> torch.Tensor:
        self._enter("reduce_scatter", t.shape)
        if t.shape[0] % self.size:
            raise ValueError(f"{self.label}: reduce_scatter of {t.shape[0]} rows over {self.size}")
        return t if self.size == 1 else self._reduce_scatter(t)

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        self._enter("broadcast", t.shape)
        return t if self.size == 1 else self._broadcast(t, src)

    def all_gather_object(self, obj: Any) -> list[Any]:
        self._enter("all_gather_object", ())
        return [obj] if self.size == 1 else self._all_gather_object(obj)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        self._enter("broadcast_object", ())
        return obj if self.size == 1 else self._broadcast_object(obj, src)

    def _enter(self, op: str, shape: Any) -> None:
        shape = tuple(int(x) for x in shape)
        self.trace.record(self.name, op, shape)
        self.issued += 1
        if self.lockstep and self.size > 1:
            self._check_lockstep(op, shape)

    def _check_lockstep(self, op: str, shape: tuple[int, ...]) -> None:
        """--debug-lockstep: agree on (sequence number, op, shape) before running the op.

        The probe has the same shape on every rank, so a divergent branch is reported here,
        naming the collective, instead of mis-matching inside gloo/NCCL and hanging.
        """
        dims = list(shape[:_PROBE_DIMS]) + [-1] * (_PROBE_DIMS - min(len(shape), _PROBE_DIMS))
        probe = torch.tensor([[self.issued, _OPS.index(op), len(shape), *dims]], dtype=torch.int64)
        rows = self._all_gather(probe.to(self.probe_device)).cpu().tolist()
        if all(r == rows[0] for r in rows):
            return

        def describe(r: list[int]) -> str:
            return f"#{r[0]} {_OPS[r[1]]}{[d for d in r[3 : 3 + min(r[2], _PROBE_DIMS)]]}"

        issued = ", ".join(f"rank {rank}: {describe(r)}" for rank, r in zip(self.ranks, rows))
        raise CollectiveError(f"lock-step divergence in group {self.label}: {issued}")

    @abstractmethod
    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _all_gather(self, t: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _reduce_scatter(self, t: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor: ...

    @abstractmethod
    def _all_gather_object(self, obj: Any) -> list[Any]: ...

    @abstractmethod
    def _broadcast_object(self, obj: Any, src: int) -> Any: ...


class TorchGroup(Group):
    """A torch.distributed process group (gloo on CPU, NCCL on GPU)."""

    def __init__(
        self,
        name: str,
        ranks: list[int],
        rank: int,
        trace: Trace,
        pg: dist.ProcessGroup,
        label: str | None = None,
    ) -> None:
        super().__init__(name, ranks, rank, trace, label)
        self.pg = pg
        self.is_gloo = dist.get_backend(pg) == "gloo"
        self.native_reduce_scatter = not self.is_gloo
        self.capturable = dist.get_backend(pg) == "nccl"
        if not self.is_gloo:
            self.probe_device = torch.device("cuda", torch.cuda.current_device())

    def _wrap(self, op: str, fn: Any) -> Any:
        try:
            return fn()
        except RuntimeError as e:  # gloo/NCCL errors are terse: say which collective failed
            raise CollectiveError(f"{self.label}.{op} failed: {e}") from e

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()
        if t.numel() == 0:  # gloo rejects empty buffers
            return t
        self._wrap("all_reduce", lambda: dist.all_reduce(t, group=self.pg))
        return t

    def _all_gather(self, t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()
        if t.numel() == 0:  # gloo rejects empty buffers; the result is empty anyway
            return t.new_empty((0, *t.shape[1:]))
        if self.is_gloo:
            parts = [torch.empty_like(t) for _ in range(self.size)]
            self._wrap("all_gather", lambda: dist.all_gather(parts, t, group=self.pg))
            return torch.cat(parts)
        out = t.new_empty((self.size * t.shape[0], *t.shape[1:]))
        self._wrap("all_gather", lambda: dist.all_gather_into_tensor(out, t, group=self.pg))
        return out

    def _reduce_scatter(self, t: torch.Tensor) -> torch.Tensor:
        n = t.shape[0] // self.size
        if self.is_gloo:  # gloo's reduce_scatter is slow: all-reduce + slice is cheaper on CPU
            full = self._all_reduce(t.clone())
            return full[self.rank_in_group * n : (self.rank_in_group + 1) * n].clone()
        out = t.new_empty((n, *t.shape[1:]))
        self._wrap(
            "reduce_scatter",
            lambda: dist.reduce_scatter_tensor(out, t.contiguous(), group=self.pg),
        )
        return out

    def _broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        t = t.contiguous()
        self._wrap("broadcast", lambda: dist.broadcast(t, self.ranks[src], group=self.pg))
        return t

    def _all_gather_object(self, obj: Any) -> list[Any]:
        # Length first, then padded bytes: gloo cannot all-gather unequal sizes.
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        sizes = self._all_gather(torch.tensor([data.numel()], dtype=torch.int64)).tolist()
        buf = torch.zeros(max(sizes), dtype=torch.uint8)
        buf[: data.numel()] = data
        rows = self._all_gather(buf.unsqueeze(0))
        return [pickle.loads(rows[i, :n].numpy().tobytes()) for i, n in enumerate(sizes)]

    def _broadcast_object(self, obj: Any, src: int) -> Any:
        box = [obj]
        self._wrap(
            "broadcast_object",
            lambda: dist.broadcast_object_list(box, src=self.ranks[src], group=self.pg),
        )
        return box[0]
