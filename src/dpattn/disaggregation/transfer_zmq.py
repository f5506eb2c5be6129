"""The `zmq` transfer backend: KV heads per layer, then the aux data, over one PUSH/PULL
connection per (prefill rank, decode rank) pair, so the aux never overtakes its KV.

Every rank binds one PULL socket (its endpoint). A prefill rank registers its endpoint with the
bootstrap service; the decode group's leader sends each prefill rank of the request's group a
KVInit naming, per decode rank, the endpoint and the global KV heads to send there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch
import zmq

from dpattn.disaggregation.layout import (
    KVLayout,
    RankInfo,
    expected_sources,
    kv_heads_of,
    plan_targets,
)
from dpattn.disaggregation.liveness import PrefillLiveness
from dpattn.disaggregation.states import KVPoll, advance
from dpattn.disaggregation.transfer import DecodeTransfer, PrefillTransfer, TransferStats
from dpattn.disaggregation.wire import (
    KVAbort,
    KVAux,
    KVChunk,
    KVInit,
    decode,
    encode,
    tensor_bytes,
    tensor_from,
)
from dpattn.distributed.parallel_state import ParallelState
from dpattn.kvcache.memory_pool import KVPool
from dpattn.messages import BootstrapInfo

GONE_MEMORY = 10_000  # aborted rooms a prefill rank remembers for a late handshake


class _Sockets:
    """One bound PULL socket and cached PUSH sockets to peers' endpoints."""

    def __init__(self, host: str) -> None:
        self.ctx = zmq.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        port = self.pull.bind_to_random_port(f"tcp://{host}")
        self.endpoint = f"tcp://{host}:{port}"
        self._push: dict[str, zmq.Socket] = {}

    def push(self, endpoint: str) -> zmq.Socket:
        sock = self._push.get(endpoint)
        if sock is None:
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, 0)  # never block the rank loop on a slow peer
            sock.setsockopt(zmq.LINGER, 1000)
            sock.connect(endpoint)
            self._push[endpoint] = sock
        return sock

    def incoming(self) -> list[list[bytes]]:
        frames = []
        while self.pull.poll(0):
            frames.append(self.pull.recv_multipart())
        return frames

    def close(self) -> None:
        for sock in [self.pull, *self._push.values()]:
            sock.close(linger=1000)
        self.ctx.term()


class ZmqPrefillTransfer(PrefillTransfer):
    def __init__(self, ps: ParallelState, layout: KVLayout, host: str) -> None:
        self.ps = ps
        self.layout = layout
        self.sock = _Sockets(host)
        self.stats = TransferStats()
        self.heads = kv_heads_of(layout.num_kv_heads, ps.attn_tp_size, ps.attn_tp_rank)
        self.inits: dict[int, KVInit] = {}
        self.failed: dict[int, str] = {}
        self.sent: set[int] = set()
        # Rooms given up here before the decode side's handshake came: answered with KVAbort.
        self.gone: dict[int, str] = {}

    def info(self) -> RankInfo:
        ps = self.ps
        return RankInfo(
            ps.dp_rank,
            ps.dp_size,
            ps.attn_tp_rank,
            ps.attn_tp_size,
            self.sock.endpoint,
            self.layout,
        )

    def _drain(self) -> None:
        # Handshakes / aborts of rooms this rank never sees (the request went elsewhere or
        # never came): the oldest are forgotten past GONE_MEMORY.
        for table in (self.inits, self.failed):
            while len(table) > GONE_MEMORY:
                table.pop(next(iter(table)))
        for frames in self.sock.incoming():
            msg = decode(frames[0])
            if isinstance(msg, KVInit):
                gone = self.gone.pop(msg.room, None)
                why = gone or self.layout.mismatch(msg.decode_kv)
                if why:
                    self._notify(msg.targets, KVAbort(msg.room, why))
                    if gone is None:  # the request is still here: it fails too
                        self.failed[msg.room] = why
                else:
                    self.inits[msg.room] = msg
            elif isinstance(msg, KVAbort):
                self.failed[msg.room] = f"the decode server gave the request up: {msg.reason}"

    def poll_bootstrap(self, rooms: list[int]) -> list[KVPoll]:
        self._drain()
        return [
            KVPoll.Failed
            if r in self.failed
            else KVPoll.WaitingForInput
            if r in self.inits
            else KVPoll.Bootstrapping
            for r in rooms
        ]

    def send(self, room: int, pool: KVPool, slots: torch.Tensor, aux: KVAux) -> None:
        init = self.inits.get(room)
        if init is None or room in self.failed:
            self.failed.setdefault(room, "no handshake from the decode server")
            return
        if init.num_tokens != slots.numel():
            self.failed[room] = (
                f"decode reserved {init.num_tokens} slots, prefill has {slots.numel()}"
            )
            self._notify(init.targets, KVAbort(room, self.failed[room]))
            return
        try:
            for endpoint, heads in init.targets:
                push = self.sock.push(endpoint)
                idx = torch.tensor([self.heads.index(h) for h in heads], device=slots.device)
                for layer in range(len(pool.k)):
                    k = pool.k[layer][slots][:, idx]
                    v = pool.v[layer][slots][:, idx]
                    dtype = str(k.dtype).removeprefix("torch.")
                    head = KVChunk(room, layer, heads, self.ps.attn_tp_rank, tuple(k.shape), dtype)
                    kb, vb = tensor_bytes(k), tensor_bytes(v)
                    push.send_multipart([encode(head), kb, vb])
                    self.stats.bytes += len(kb) + len(vb)
                done = replace(aux, source=self.ps.attn_tp_rank, num_chunks=len(pool.k))
                push.send_multipart([encode(done)])
        except zmq.ZMQError as e:
            self.failed[room] = f"KV send failed: {e}"
            self.stats.failed += 1
            return
        self.sent.add(room)
        self.stats.done += 1

    def poll_sent(self, rooms: list[int]) -> list[KVPoll]:
        self._drain()
        return [
            KVPoll.Failed
            if r in self.failed
            else KVPoll.Success
            if r in self.sent
            else KVPoll.Transferring
            for r in rooms
        ]

    def reason(self, room: int) -> str:
        return self.failed.get(room, "")

    def _notify(self, targets: list[tuple[str, list[int]]], msg: KVAbort) -> None:
        for endpoint, _ in targets:
            self.sock.push(endpoint).send_multipart([encode(msg)])

    def abort(self, room: int, reason: str) -> None:
        init = self.inits.get(room)
        if init is not None:
            self._notify(init.targets, KVAbort(room, reason))
        elif room not in self.failed:  # the handshake may still come: answer it then
            self.gone[room] = reason
            if len(self.gone) > GONE_MEMORY:
                self.gone.pop(next(iter(self.gone)))
        self.release(room)

    def release(self, room: int) -> None:
        self.inits.pop(room, None)
        self.failed.pop(room, None)
        self.sent.discard(room)

    def close(self) -> None:
        self.sock.close()


@dataclass
class _Receiver:
    bootstrap: BootstrapInfo
    slots: torch.Tensor
    state: KVPoll = KVPoll.Bootstrapping
    started: float = field(default_factory=time.monotonic)
    sources: set[int] | None = None  # prefill attention-TP ranks that send to us (once known)
    chunks: dict[int, int] = field(default_factory=dict)
    aux: dict[int, KVAux] = field(default_factory=dict)
    reason: str = ""

    @property
    def addr(self) -> tuple[str, int]:
        return (self.bootstrap.host, self.bootstrap.port)


class ZmqDecodeTransfer(DecodeTransfer):
    def __init__(
        self, ps: ParallelState, pool: KVPool, layout: KVLayout, host: str, heartbeat_s: float
    ) -> None:
        self.ps = ps
        self.pool = pool
        self.layout = layout
        self.sock = _Sockets(host)
        self.stats = TransferStats()
        # Every rank of the group builds this in lock-step: the leader names them all in KVInit.
        self.group_endpoints: list[str] = ps.attn_tp_cpu.all_gather_object(self.sock.endpoint)
        self.heads = kv_heads_of(layout.num_kv_heads, ps.attn_tp_size, ps.attn_tp_rank)
        self.liveness = PrefillLiveness(heartbeat_s)
        self.receivers: dict[int, _Receiver] = {}

    def start(self, bootstrap: BootstrapInfo, slots: torch.Tensor) -> None:
        self.receivers[bootstrap.room] = _Receiver(bootstrap, slots)
        self.liveness.watch((bootstrap.host, bootstrap.port))

    def _fail(self, recv: _Receiver, reason: str) -> None:
        if recv.state is not KVPoll.Failed:
            recv.reason = reason
            recv.state = KVPoll.Failed
            self.stats.failed += 1

    def _group(self, recv: _Receiver) -> list[RankInfo] | None:
        ranks = self.liveness.ranks(recv.addr)
        if ranks is None:
            return None
        d = recv.bootstrap.room % ranks[0].dp_size  # the prefill DP group of the request
        return sorted((r for r in ranks if r.dp_rank == d), key=lambda r: r.attn_tp_rank)

    def _handshake(self, room: int, recv: _Receiver) -> None:
        group = self._group(recv)
        if group is None:
            return
        why = group[0].kv.mismatch(self.layout)
        if why:
            self._fail(recv, f"{why} (prefill server {recv.addr[0]}:{recv.addr[1]})")
            return
        width = group[0].attn_tp_size
        recv.sources = expected_sources(
            self.layout.num_kv_heads, width, self.ps.attn_tp_size, self.ps.attn_tp_rank
        )
        if self.ps.attn_tp_rank == 0:  # the leader speaks for the group, once per room
            plan = plan_targets(self.layout.num_kv_heads, width, self.group_endpoints)
            n = int(recv.slots.numel())
            for info in group:
                init = KVInit(room, plan[info.attn_tp_rank], self.layout, n)
                self.sock.push(info.endpoint).send_multipart([encode(init)])
        recv.state = advance(recv.state, KVPoll.WaitingForInput)

    def _on_message(self, frames: list[bytes]) -> None:
        msg = decode(frames[0])
        recv = self.receivers.get(getattr(msg, "room", -1))
        if recv is None or recv.state is KVPoll.Failed:
            return  # aborted or released: its slots may belong to another request now
        if isinstance(msg, KVChunk):
            idx = torch.tensor([self.heads.index(h) for h in msg.heads], device=self.pool.device)
            rows = recv.slots[:, None]
            k = tensor_from(frames[1], msg.shape, msg.dtype).to(self.pool.device)
            v = tensor_from(frames[2], msg.shape, msg.dtype).to(self.pool.device)
            self.pool.k[msg.layer][rows, idx[None, :]] = k
            self.pool.v[msg.layer][rows, idx[None, :]] = v
            recv.chunks[msg.source] = recv.chunks.get(msg.source, 0) + 1
            self.stats.bytes += len(frames[1]) + len(frames[2])
            recv.state = advance(recv.state, KVPoll.Transferring)
        elif isinstance(msg, KVAux):
            if recv.chunks.get(msg.source, 0) != msg.num_chunks:
                self._fail(recv, f"prefill rank {msg.source} sent an incomplete KV cache")
            recv.aux[msg.source] = msg
        elif isinstance(msg, KVAbort):
            self._fail(recv, msg.reason)

    def poll(self, rooms: list[int]) -> list[KVPoll]:
        for frames in self.sock.incoming():
            self._on_message(frames)
        out = []
        for room in rooms:
            recv = self.receivers[room]
            dead = self.liveness.dead(recv.addr)
            if dead and recv.state is not KVPoll.Success:
                self._fail(recv, dead)
            if recv.state is KVPoll.Bootstrapping:
                self._handshake(room, recv)
            if recv.sources is not None and recv.sources <= set(recv.aux):
                if recv.state is not KVPoll.Success and recv.state is not KVPoll.Failed:
                    self.stats.done += 1
                    self.stats.seconds += time.monotonic() - recv.started
                recv.state = advance(recv.state, KVPoll.Success)
            out.append(recv.state)
        return out

    def aux(self, room: int) -> KVAux:
        recv = self.receivers[room]
        first = recv.aux[min(recv.aux)]
        assert first.room == room, f"aux of room {first.room} for room {room}"
        return first

    def reason(self, room: int) -> str:
        recv = self.receivers.get(room)
        return recv.reason if recv is not None else ""

    def abort(self, room: int, reason: str) -> None:
        recv = self.receivers.get(room)
        if recv is not None and self.ps.attn_tp_rank == 0:
            for info in self._group(recv) or []:  # no look-up yet: the prefill never heard of it
                self.sock.push(info.endpoint).send_multipart([encode(KVAbort(room, reason))])
        self.release(room)

    def cancel(self, bootstrap: BootstrapInfo, reason: str) -> None:
        if self.ps.attn_tp_rank != 0:
            return
        ranks = self.liveness.ranks((bootstrap.host, bootstrap.port))
        for info in ranks or []:
            if info.dp_rank == bootstrap.room % info.dp_size:
                self.sock.push(info.endpoint).send_multipart(
                    [encode(KVAbort(bootstrap.room, reason))]
                )

    def release(self, room: int) -> None:
        recv = self.receivers.pop(room, None)
        if recv is not None:
            self.liveness.unwatch(recv.addr)

    def close(self) -> None:
        self.liveness.close()
        self.sock.close()
