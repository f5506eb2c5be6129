"""The `zmq` transfer backend, prefill side: a rank learns from the decode group's leader
(KVInit) which decode endpoint gets which of its KV heads, then sends the request's KV per layer
(K and V, or an MLA model's latent rows) and, after it on the same PUSH/PULL connection, the aux
data (first token, logprobs, room).

With pipeline stages every stage's rank sends its own layers (global indices in KVChunk) and its
own aux; only stage 0's ranks get the decode side's handshakes, a later stage's rank `adopt`s
its lane's (prefill_pipeline.py)."""

from __future__ import annotations

from dataclasses import replace

import torch
import zmq

from dpattn.disaggregation.layout import KVLayout, RankInfo, kv_heads_of
from dpattn.disaggregation.states import KVPoll
from dpattn.disaggregation.transfer import PrefillTransfer, TransferStats
from dpattn.disaggregation.wire import KVAbort, KVAux, KVChunk, KVInit, decode, encode, tensor_bytes
from dpattn.disaggregation.zmq_sockets import Sockets
from dpattn.distributed.parallel_state import ParallelState
from dpattn.kvcache.memory_pool import KVPool

GONE_MEMORY = 10_000  # aborted rooms a prefill rank remembers for a late handshake


class ZmqPrefillTransfer(PrefillTransfer):
    def __init__(
        self,
        ps: ParallelState,
        layout: KVLayout,
        host: str,
        layers: tuple[int, int] | None = None,
    ) -> None:
        self.ps = ps
        self.layout = layout
        # The global layers [start, end) of this rank's pool (its pipeline stage's; all of them
        # without stages): KVChunk.layer is global, the decode side's pool holds every layer.
        self.layers = layers or (0, layout.num_layers)
        self.sock = Sockets(host)
        self.stats = TransferStats()
        self.heads = kv_heads_of(layout.num_kv_heads, ps.attn_tp_size, ps.attn_tp_rank)
        self.inits: dict[int, KVInit] = {}
        self.failed: dict[int, str] = {}
        self.sent: set[int] = set()
        self.tokens: dict[int, int] = {}  # room -> prompt positions sent so far
        self.chunks: dict[tuple[int, str], int] = {}  # (room, endpoint) -> KVChunks sent
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
            ps.pp_rank,
            ps.pp_size,
            *self.layers,
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

    def _ready(self, room: int) -> KVInit | None:
        init = self.inits.get(room)
        if init is None or room in self.failed:
            self.failed.setdefault(room, "no handshake from the decode server")
            return None
        return init

    def _error(self, room: int, init: KVInit, reason: str) -> None:
        self.failed[room] = reason
        self.stats.failed += 1
        try:
            self._notify(init.targets, KVAbort(room, reason))
        except zmq.ZMQError:
            pass

    def send_kv(self, room: int, pool: KVPool, slots: torch.Tensor, start: int) -> None:
        init = self._ready(room)
        if init is None:
            return
        if start != self.tokens.get(room, 0) or start + slots.numel() > init.num_tokens:
            self._error(room, init, f"KV positions {start}+{slots.numel()} out of order")
            return
        try:
            for endpoint, heads in init.targets:
                push = self.sock.push(endpoint)
                idx = torch.tensor([self.heads.index(h) for h in heads], device=slots.device)
                for layer in range(len(pool.k)):
                    # [K, V], or an MLA pool's [latent]: a frame each, after the header
                    parts = [buf[slots][:, idx] for buf in pool.layer_buffers(layer)]
                    dtype = str(parts[0].dtype).removeprefix("torch.")
                    me, stage, shape = self.ps.attn_tp_rank, self.ps.pp_rank, parts[0].shape
                    glob = self.layers[0] + layer
                    head = KVChunk(room, start, glob, heads, me, tuple(shape), dtype, stage)
                    frames = [tensor_bytes(t) for t in parts]
                    push.send_multipart([encode(head), *frames])
                    self.stats.bytes += sum(len(f) for f in frames)
                    self.chunks[(room, endpoint)] = self.chunks.get((room, endpoint), 0) + 1
        except zmq.ZMQError as e:
            self._error(room, init, f"KV send failed: {e}")
            return
        self.tokens[room] = start + slots.numel()

    def send_aux(self, room: int, aux: KVAux) -> None:
        init = self._ready(room)
        if init is None:
            return
        if self.tokens.get(room, 0) != init.num_tokens:
            have = self.tokens.get(room, 0)
            self._error(room, init, f"decode reserved {init.num_tokens} slots, prefill sent {have}")
            return
        try:
            for endpoint, _ in init.targets:
                n = self.chunks.get((room, endpoint), 0)
                me, stage = self.ps.attn_tp_rank, self.ps.pp_rank
                done = replace(aux, source=me, num_chunks=n, stage=stage)
                self.sock.push(endpoint).send_multipart([encode(done)])
        except zmq.ZMQError as e:
            self._error(room, init, f"KV send failed: {e}")
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

    def handshake(self, room: int) -> KVInit | None:
        return self.inits.get(room)

    def adopt(self, room: int, init: KVInit | None) -> None:
        if init is not None:
            self.inits[room] = init

    def abort(self, room: int, reason: str) -> None:
        init = self.inits.get(room)
        if init is not None:
            self._notify(init.targets, KVAbort(room, reason))
        elif room not in self.failed and self.ps.pp_rank == 0:
            # The handshake may still come (to stage 0's ranks only): answer it then.
            self.gone[room] = reason
            if len(self.gone) > GONE_MEMORY:
                self.gone.pop(next(iter(self.gone)))
        self.release(room)

    def release(self, room: int) -> None:
        init = self.inits.pop(room, None)
        self.failed.pop(room, None)
        self.sent.discard(room)
        self.tokens.pop(room, None)
        for endpoint, _ in init.targets if init is not None else []:
            self.chunks.pop((room, endpoint), None)

    def close(self) -> None:
        self.sock.close()
