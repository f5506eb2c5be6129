"""Point-to-point between pipeline stages (docs/design.md §1): a rank's `PipelineLink`.

A rank talks only to its own lane (layout.py): the same (dp, attn_tp) position in the other
stages. Activations go to the next stage; the last stage's next stage is stage 0, so the ring
that carries the results back is the same `send`. Every message is a header (sequence number,
kind, the caller's tag, the tensors' names, shapes and dtypes, or a small object) followed by
the tensors' data: shapes change every step and gloo can only receive into a buffer of the
sent size. Sends do not block (the ring would deadlock with two stages sending to each other);
receives block for at most the collective timeout, and every failure names this rank's stage
and the peer. Each message is checked on arrival: kind, per-channel sequence number and, when
the receiver gives one, the tag, so ranks that diverge on what they send (a skip rule that
differs between stages, say) are named at the next message instead of mis-reading data.
Every send and receive is recorded in the rank's `Trace` on the channel `pp<src>><dst>`
(stages), one (channel, op, shape) entry per tensor, so the sender's and the receiver's
entries on one channel can be compared like a group's collectives.

Implementations: `TorchLink` here (gloo; NCCL for device tensors with a gloo header) and
`ThreadLink` (thread_backend.py: mailboxes of the in-process world).
"""

from __future__ import annotations

import datetime
import pickle
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from dpattn.distributed.group import CollectiveError, Trace
from dpattn.distributed.layout import Layout

Tensors = dict[str, torch.Tensor] | list[torch.Tensor]
T = TypeVar("T")


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: str  # "cpu" or "cuda": the receiver allocates on its own device of that type


@dataclass(frozen=True)
class Header:
    seq: int  # messages sent before this one on the channel
    kind: str  # "tensors" | "object"
    tag: str
    names: tuple[str, ...] | None = None  # a dict's keys; None: a list of tensors
    metas: tuple[TensorMeta, ...] = ()
    obj: Any = None

    def describe(self) -> str:
        return f"{self.kind} #{self.seq}" + (f" {self.tag!r}" if self.tag else "")


def channel(src_stage: int, dst_stage: int) -> str:
    """The trace's group name for messages from one stage to another."""
    return f"pp{src_stage}>{dst_stage}"


class PipelineLink(ABC):
    """One rank's sends to and receives from its lane's ranks in other stages."""

    def __init__(
        self, layout: Layout, rank: int, trace: Trace, timeout_s: float, device: torch.device
    ) -> None:
        self.layout = layout
        self.rank = rank  # global
        self.stage = layout.stage(rank)
        self.trace = trace
        self.timeout_s = timeout_s  # how long a receive (or a queued send) may wait
        self.device = torch.device(device)
        self.sent = [0] * layout.pp_size  # per destination stage
        self.received = [0] * layout.pp_size  # per source stage

    @property
    def num_stages(self) -> int:
        return self.layout.pp_size

    @property
    def next_stage(self) -> int:
        """Where `send` goes by default: the next stage, or stage 0 from the last (the ring)."""
        return (self.stage + 1) % self.num_stages

    @property
    def prev_stage(self) -> int:
        """Where `recv` reads by default: the previous stage, or the last one at stage 0."""
        return (self.stage - 1) % self.num_stages

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.num_stages - 1

    def peer(self, stage: int) -> int:
        """The global rank of this rank's lane in `stage`."""
        if stage == self.stage:
            raise ValueError(f"stage {stage} rank {self.rank}: a stage does not send to itself")
        return self.layout.global_rank(stage, self.layout.rank_in_stage(self.rank))

    def send(self, tensors: Tensors, dst_stage: int | None = None, tag: str = "") -> None:
        """Queue tensors (a dict or a list; zero rows allowed) for the same lane in dst_stage."""
        dst = self.next_stage if dst_stage is None else dst_stage
        peer, what = self.peer(dst), self._what("send to", dst)
        names = tuple(tensors) if isinstance(tensors, dict) else None
        values = list(tensors.values()) if isinstance(tensors, dict) else list(tensors)
        metas = tuple(TensorMeta(tuple(t.shape), t.dtype, t.device.type) for t in values)
        header = Header(self._count(self.sent, dst), "tensors", tag, names, metas)
        for t in values:
            self.trace.record(channel(self.stage, dst), "send", tuple(t.shape))
        self._post(peer, header, values, what)

    def recv(self, src_stage: int | None = None, tag: str = "") -> Tensors:
        """The next tensors from the same lane in src_stage, as sent (dict or list)."""
        src = self.prev_stage if src_stage is None else src_stage
        header, values = self._receive(src, "tensors", tag)
        for t in values:
            self.trace.record(channel(src, self.stage), "recv", tuple(t.shape))
        return values if header.names is None else dict(zip(header.names, values))

    def send_object(self, obj: Any, dst_stage: int | None = None, tag: str = "") -> None:
        """Queue a small picklable object (metadata: next-token ids, a batch's description)."""
        dst = self.next_stage if dst_stage is None else dst_stage
        peer, what = self.peer(dst), self._what("send to", dst)
        header = Header(self._count(self.sent, dst), "object", tag, obj=obj)
        self.trace.record(channel(self.stage, dst), "send_object", ())
        self._post(peer, header, [], what)

    def recv_object(self, src_stage: int | None = None, tag: str = "") -> Any:
        src = self.prev_stage if src_stage is None else src_stage
        header, _ = self._receive(src, "object", tag)
        self.trace.record(channel(src, self.stage), "recv_object", ())
        return header.obj

    @abstractmethod
    def flush(self) -> None:
        """Wait until every queued send has been delivered (or fail, named)."""

    def _receive(self, src: int, kind: str, tag: str) -> tuple[Header, list[torch.Tensor]]:
        what = self._what("recv from", src)
        expected = self._count(self.received, src)
        header, values = self._take(self.peer(src), what)
        if header.kind != kind or header.seq != expected or (tag and header.tag != tag):
            want = Header(expected, kind, tag).describe()
            err = CollectiveError(f"{what}: expected {want}, the peer sent {header.describe()}")
            self._abort(err)
            raise err
        return header, values

    def _what(self, op: str, peer_stage: int) -> str:
        return f"stage {self.stage} rank {self.rank}: {op} stage {peer_stage} rank " + str(
            self.peer(peer_stage)
        )

    @staticmethod
    def _count(counts: list[int], stage: int) -> int:
        counts[stage] += 1
        return counts[stage] - 1

    @abstractmethod
    def _abort(self, error: CollectiveError) -> None:
        """A message mismatch: stop the peers too where the backend can (threads)."""

    @abstractmethod
    def _post(self, dst: int, header: Header, values: list[torch.Tensor], what: str) -> None: ...

    @abstractmethod
    def _take(self, src: int, what: str) -> tuple[Header, list[torch.Tensor]]: ...


FRAME = 512  # bytes of the header message: its pickle's length (int64), then the pickle
MAX_IN_FLIGHT = 256  # queued sends before the oldest is waited for (back-pressure)


class TorchLink(PipelineLink):
    """torch.distributed send/recv on the lane's process groups.

    Headers and CPU tensors go on `cpu_pg` (gloo), device tensors on `pg` (NCCL on CUDA; the
    same group on CPU). A header longer than FRAME follows in a second message of known size.
    Every send's work and buffer are kept until waited for (a gloo send dropped before that
    was seen never to arrive). NCCL (untested here): a lane's two directions share one communicator, whose sends
    wait for the matching receive, so device tensors must not cross in both directions at once;
    the ring's token ids are small and go as CPU tensors or objects (gloo).
    """

    def __init__(
        self,
        layout: Layout,
        rank: int,
        trace: Trace,
        timeout_s: float,
        device: torch.device,
        pg: dist.ProcessGroup,
        cpu_pg: dist.ProcessGroup,
    ) -> None:
        super().__init__(layout, rank, trace, timeout_s, device)
        self.pg, self.cpu_pg = pg, cpu_pg
        # gloo marks a send complete only when waited for: keep each (work, buffer, what)
        self.in_flight: deque[tuple[dist.Work, torch.Tensor, str]] = deque()

    def _post(self, dst: int, header: Header, values: list[torch.Tensor], what: str) -> None:
        data = pickle.dumps(header)
        frame = torch.zeros(FRAME, dtype=torch.uint8)
        frame[:8] = torch.tensor([len(data)], dtype=torch.int64).view(torch.uint8)
        head = min(len(data), FRAME - 8)
        frame[8 : 8 + head] = torch.frombuffer(bytearray(data[:head]), dtype=torch.uint8)
        self._isend(frame, dst, self.cpu_pg, what)
        if len(data) > head:
            rest = torch.frombuffer(bytearray(data[head:]), dtype=torch.uint8)
            self._isend(rest, dst, self.cpu_pg, what)
        for t in values:
            if t.numel():  # the shape is in the header: a zero-row tensor sends no data
                self._isend(t.contiguous(), dst, self._group(t.device.type), what)

    def _take(self, src: int, what: str) -> tuple[Header, list[torch.Tensor]]:
        frame = torch.empty(FRAME, dtype=torch.uint8)
        self._irecv(frame, src, self.cpu_pg, what)
        n = int(frame[:8].view(torch.int64).item())
        data = frame[8 : 8 + min(n, FRAME - 8)].numpy().tobytes()
        if n > FRAME - 8:
            rest = torch.empty(n - (FRAME - 8), dtype=torch.uint8)
            self._irecv(rest, src, self.cpu_pg, what)
            data += rest.numpy().tobytes()
        header: Header = pickle.loads(data)
        values = []
        for m in header.metas:
            device = self.device if m.device != "cpu" else torch.device("cpu")
            t = torch.empty(m.shape, dtype=m.dtype, device=device)
            if t.numel():
                self._irecv(t, src, self._group(device.type), what)
            values.append(t)
        return header, values

    def flush(self) -> None:
        while self.in_flight:
            self._wait_oldest()

    def _abort(self, error: CollectiveError) -> None:
        pass  # a process cannot stop its peers: their receives fail, named, by the timeout

    def _group(self, device_type: str) -> dist.ProcessGroup:
        return self.cpu_pg if device_type == "cpu" else self.pg

    def _isend(self, t: torch.Tensor, dst: int, pg: dist.ProcessGroup, what: str) -> None:
        while len(self.in_flight) >= MAX_IN_FLIGHT:
            self._wait_oldest()
        work = self._wrap(what, lambda: dist.isend(t, dst, group=pg))
        assert work is not None  # only None for a rank outside the group
        self.in_flight.append((work, t, what))  # the buffer lives until the send completes

    def _wait_oldest(self) -> None:
        work, _, what = self.in_flight.popleft()
        self._wrap(what, lambda: work.wait(self._timeout()))

    def _irecv(self, t: torch.Tensor, src: int, pg: dist.ProcessGroup, what: str) -> None:
        work = self._wrap(what, lambda: dist.irecv(t, src, group=pg))
        assert work is not None
        self._wrap(what, lambda: work.wait(self._timeout()))

    def _timeout(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.timeout_s)

    def _wrap(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except RuntimeError as e:  # gloo: "Timed out waiting ...", "Connection closed by peer"
            why = f"timed out after {self.timeout_s:g} s" if "imed out" in str(e) else str(e)
            raise CollectiveError(f"{what}: {why}") from e
