"""Transfer backend interfaces (one object per rank) and the `fake` backend.

Prefill side: `PrefillTransfer` learns from the decode side where a request's KV goes (the
handshake), sends it after the forward, and reports per-room states. Decode side:
`DecodeTransfer` starts a receiver per request (its reserved slots), polls arrivals, and hands
over the aux data (first token) once complete. States are this rank's own; the schedulers agree
on them over the attention-TP group before acting (states.consensus).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from dpattn.disaggregation.states import KVPoll
from dpattn.disaggregation.wire import KVAux, KVInit
from dpattn.kvcache.memory_pool import KVPool
from dpattn.messages import BootstrapInfo


@dataclass
class TransferStats:
    """Cumulative, per rank: what the transfer moved (metrics take differences)."""

    bytes: int = 0
    done: int = 0  # rooms completed (sent / received whole)
    failed: int = 0
    seconds: float = 0.0  # decode side: from the receiver's start to its Success, summed


class PrefillTransfer(ABC):
    stats: TransferStats

    @abstractmethod
    def poll_bootstrap(self, rooms: list[int]) -> list[KVPoll]:
        """WaitingForInput once the decode side's handshake for the room arrived. Reads the
        decode side's messages: an idle server calls it with no rooms every step, so that a
        late handshake for a room it gave up is answered (KVAbort with the reason)."""

    @abstractmethod
    def send_kv(self, room: int, pool: KVPool, slots: torch.Tensor, start: int) -> None:
        """KV (all layers) of prompt positions [start, start + len(slots)), to the handshake's
        targets: called after each prefill chunk, so the transfer overlaps the next chunks."""

    @abstractmethod
    def send_aux(self, room: int, aux: KVAux) -> None:
        """After the whole prompt's KV: the first token and its logprobs."""

    @abstractmethod
    def poll_sent(self, rooms: list[int]) -> list[KVPoll]: ...

    @abstractmethod
    def reason(self, room: int) -> str:
        """Why the room failed (for the log and the error)."""

    @abstractmethod
    def abort(self, room: int, reason: str) -> None:
        """Tell the decode side (if it reached us) and forget the room."""

    @abstractmethod
    def release(self, room: int) -> None: ...

    def handshake(self, room: int) -> KVInit | None:
        """Pipeline stages: the room's handshake as this stage-0 rank received it, which the
        same rank of every later stage `adopt`s (None: the backend has nothing to hand on)."""
        return None

    def adopt(self, room: int, init: KVInit | None) -> None:  # noqa: B027 - optional
        """A later pipeline stage: the handshake of its lane's stage-0 rank (same targets)."""

    def close(self) -> None:  # noqa: B027 - optional: only a backend with sockets has one
        pass


class DecodeTransfer(ABC):
    stats: TransferStats

    @abstractmethod
    def start(self, bootstrap: BootstrapInfo, slots: torch.Tensor) -> None:
        """A receiver for the room, writing into `slots` (reserved in prealloc)."""

    def cancel(self, bootstrap: BootstrapInfo, reason: str) -> None:  # noqa: B027 - optional
        """A request given up before its receiver started: tell its prefill server."""

    def flush(self) -> None:  # noqa: B027 - optional
        """Called every step: deliver what could not be delivered before (cancels)."""

    @abstractmethod
    def poll(self, rooms: list[int]) -> list[KVPoll]: ...

    @abstractmethod
    def aux(self, room: int) -> KVAux:
        """The aux data of a room this rank polled as Success (the scheduler checks its room
        before the group agrees on the state)."""

    @abstractmethod
    def reason(self, room: int) -> str: ...

    @abstractmethod
    def abort(self, room: int, reason: str) -> None: ...

    @abstractmethod
    def release(self, room: int) -> None: ...

    def close(self) -> None:  # noqa: B027 - optional: only a backend with sockets has one
        pass


class FakePrefillTransfer(PrefillTransfer):
    """Moves nothing: every handshake is there at once, every send succeeds."""

    def __init__(self) -> None:
        self.stats = TransferStats()

    def poll_bootstrap(self, rooms: list[int]) -> list[KVPoll]:
        return [KVPoll.WaitingForInput] * len(rooms)

    def send_kv(self, room: int, pool: KVPool, slots: torch.Tensor, start: int) -> None:
        pass

    def send_aux(self, room: int, aux: KVAux) -> None:
        pass

    def poll_sent(self, rooms: list[int]) -> list[KVPoll]:
        return [KVPoll.Success] * len(rooms)

    def reason(self, room: int) -> str:
        return "fake transfer"

    def abort(self, room: int, reason: str) -> None:
        pass

    def release(self, room: int) -> None:
        pass


class FakeDecodeTransfer(DecodeTransfer):
    """Moves nothing: the reserved slots keep whatever they held and the first token is
    FAKE_FIRST_TOKEN. For warm-up and decode-only benchmarks, never for real outputs."""

    FAKE_FIRST_TOKEN = 0

    def __init__(self) -> None:
        self.stats = TransferStats()

    def start(self, bootstrap: BootstrapInfo, slots: torch.Tensor) -> None:
        pass

    def poll(self, rooms: list[int]) -> list[KVPoll]:
        return [KVPoll.Success] * len(rooms)

    def aux(self, room: int) -> KVAux:
        return KVAux(room, 0, 0, self.FAKE_FIRST_TOKEN, 0.0)

    def reason(self, room: int) -> str:
        return "fake transfer"

    def abort(self, room: int, reason: str) -> None:
        pass

    def release(self, room: int) -> None:
        pass
