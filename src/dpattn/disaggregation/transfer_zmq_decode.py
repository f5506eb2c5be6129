"""The `zmq` transfer backend, decode side: a receiver per request writes arriving KV heads (or
an MLA model's latent rows) into the slots reserved in prealloc; the group's leader sends the
handshake once the prefill server's ranks are known (liveness.py looks them up off the rank
loop). A prefill server with pipeline stages registers each stage's ranks with their layers: the
handshake goes to stage 0's ranks, and a request is complete once every stage's sources (each
sending its own layers, then its aux) are."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from dpattn.disaggregation.layout import (
    KVLayout,
    RankInfo,
    expected_sources,
    kv_heads_of,
    plan_targets,
    stage_coverage,
)
from dpattn.disaggregation.liveness import PrefillLiveness
from dpattn.disaggregation.states import KVPoll, advance
from dpattn.disaggregation.transfer import DecodeTransfer, TransferStats
from dpattn.disaggregation.wire import KVAbort, KVAux, KVChunk, KVInit, decode, encode, tensor_from
from dpattn.disaggregation.zmq_sockets import Sockets
from dpattn.distributed.parallel_state import ParallelState
from dpattn.kvcache.memory_pool import KVPool
from dpattn.messages import BootstrapInfo

CANCEL_TTL_S = 60.0  # an abort waits this long for its prefill server's ranks to be known


@dataclass
class _Receiver:
    bootstrap: BootstrapInfo
    slots: torch.Tensor
    state: KVPoll = KVPoll.Bootstrapping
    started: float = field(default_factory=time.monotonic)
    # (prefill stage, attention-TP rank) pairs that send to us, once known; chunks and aux
    # are counted per pair (each has its own ordered connection).
    sources: set[tuple[int, int]] | None = None
    chunks: dict[tuple[int, int], int] = field(default_factory=dict)
    aux: dict[tuple[int, int], KVAux] = field(default_factory=dict)
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
        self.sock = Sockets(host)
        self.stats = TransferStats()
        # Every rank of the group builds this in lock-step: the leader names them all in KVInit.
        self.group_endpoints: list[str] = ps.attn_tp_cpu.all_gather_object(self.sock.endpoint)
        self.heads = kv_heads_of(layout.num_kv_heads, ps.attn_tp_size, ps.attn_tp_rank)
        self.liveness = PrefillLiveness(heartbeat_s)
        self.receivers: dict[int, _Receiver] = {}
        self.cancels: dict[int, tuple[BootstrapInfo, str, float]] = {}  # room -> until sent

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
        group = (r for r in ranks if r.dp_rank == d)  # every stage's ranks of that group
        return sorted(group, key=lambda r: (r.pp_rank, r.attn_tp_rank))

    def _handshake(self, room: int, recv: _Receiver) -> None:
        group = self._group(recv)
        if group is None:
            return
        why = group[0].kv.mismatch(self.layout) or stage_coverage(group)
        if why:
            self._fail(recv, f"{why} (prefill server {recv.addr[0]}:{recv.addr[1]})")
            return
        width = group[0].attn_tp_size
        mine = expected_sources(
            self.layout.num_kv_heads, width, self.ps.attn_tp_size, self.ps.attn_tp_rank
        )
        recv.sources = {(s, a) for s in {r.pp_rank for r in group} for a in mine}
        if self.ps.attn_tp_rank == 0:  # the leader speaks for the group, once per room
            plan = plan_targets(self.layout.num_kv_heads, width, self.group_endpoints)
            n = int(recv.slots.numel())
            for info in (r for r in group if r.pp_rank == 0):  # stage 0 hands it on
                init = KVInit(room, plan[info.attn_tp_rank], self.layout, n)
                self.sock.push(info.endpoint).send_multipart([encode(init)])
        recv.state = advance(recv.state, KVPoll.WaitingForInput)

    def _on_message(self, frames: list[bytes]) -> None:
        msg = decode(frames[0])
        recv = self.receivers.get(getattr(msg, "room", -1))
        if recv is None or recv.state is KVPoll.Failed:
            return  # aborted or released: its slots may belong to another request now
        key = (getattr(msg, "stage", 0), getattr(msg, "source", 0))
        if isinstance(msg, KVChunk):
            if msg.start < 0 or msg.start + msg.shape[0] > recv.slots.numel():
                self._fail(recv, f"KV for positions beyond the {recv.slots.numel()} reserved")
                return
            if not 0 <= msg.layer < len(self.pool.k):
                self._fail(recv, f"KV of layer {msg.layer}, the model has {len(self.pool.k)}")
                return
            buffers = self.pool.layer_buffers(msg.layer)  # [K, V], or an MLA pool's [latent]
            if len(frames) - 1 != len(buffers):
                have = "latent" if self.pool.is_latent else "K and V"
                self._fail(recv, f"{len(frames) - 1} KV buffers per layer sent, {have} here")
                return
            idx = torch.tensor([self.heads.index(h) for h in msg.heads], device=self.pool.device)
            rows = recv.slots[msg.start : msg.start + msg.shape[0], None]
            for buf, data in zip(buffers, frames[1:]):
                buf[rows, idx[None, :]] = tensor_from(data, msg.shape, msg.dtype).to(buf.device)
            recv.chunks[key] = recv.chunks.get(key, 0) + 1
            self.stats.bytes += sum(len(f) for f in frames[1:])
            recv.state = advance(recv.state, KVPoll.Transferring)
        elif isinstance(msg, KVAux):
            if recv.chunks.get(key, 0) != msg.num_chunks:
                who = f"stage {key[0]} rank {key[1]}" if key[0] else f"rank {key[1]}"
                self._fail(recv, f"prefill {who} sent an incomplete KV cache")
            recv.aux[key] = msg
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
        """The first source's aux data, as it arrived: the scheduler checks its room before the
        group's consensus (a mismatch fails the request on every rank, never just this one)."""
        recv = self.receivers[room]
        return recv.aux[min(recv.aux)]

    def reason(self, room: int) -> str:
        recv = self.receivers.get(room)
        return recv.reason if recv is not None else ""

    def abort(self, room: int, reason: str) -> None:
        recv = self.receivers.get(room)
        if recv is not None:
            self.cancel(recv.bootstrap, reason)
        self.release(room)

    def cancel(self, bootstrap: BootstrapInfo, reason: str) -> None:
        """Tell the prefill group of the room (the leader does); before its ranks are known,
        once they are (the address stays watched until then, CANCEL_TTL_S at most)."""
        if self.ps.attn_tp_rank != 0:
            return
        addr = (bootstrap.host, bootstrap.port)
        self.liveness.watch(addr)
        self.cancels[bootstrap.room] = (bootstrap, reason, time.monotonic() + CANCEL_TTL_S)
        self.flush()

    def flush(self) -> None:
        for room, (bootstrap, reason, until) in list(self.cancels.items()):
            addr = (bootstrap.host, bootstrap.port)
            ranks = self.liveness.ranks(addr)
            if ranks is None and not self.liveness.dead(addr) and time.monotonic() < until:
                continue
            for info in ranks or []:
                if info.dp_rank == room % info.dp_size:
                    self.sock.push(info.endpoint).send_multipart([encode(KVAbort(room, reason))])
            del self.cancels[room]
            self.liveness.unwatch(addr)

    def release(self, room: int) -> None:
        recv = self.receivers.pop(room, None)
        if recv is not None:
            self.liveness.unwatch(recv.addr)

    def close(self) -> None:
        self.liveness.close()
        self.sock.close()
