"""The decode server's scheduler: prealloc queue -> transfer queue -> PREBUILT batch -> running.

Prealloc reserves a request row and the prompt's KV slots (admitting only what leaves room for
the outputs of everything admitted); the transfer queue polls the receivers and agrees on their
states over the attention-TP group before any rank moves a request; agreed-complete requests
form a PREBUILT batch: no forward of its own (the MLP sync gives it an inner idle batch when
another group runs one), it only turns them into running requests with their first token.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from dpattn.config import SchedulerConfig
from dpattn.disaggregation.states import (
    NETWORK_WAIT_S,
    KVPoll,
    aborted,
    agreed_reasons,
    consensus,
    stats_with,
)
from dpattn.disaggregation.transfer import DecodeTransfer
from dpattn.executor.forward_batch import ForwardMode
from dpattn.executor.model_runner import ModelRunner
from dpattn.messages import RequestOutput
from dpattn.scheduler.mlp_sync import SyncDecision
from dpattn.scheduler.schedule_batch import FinishReason, Req, ScheduleBatch
from dpattn.scheduler.scheduler import Scheduler

log = logging.getLogger(__name__)

# Output slots admission keeps free per request (capped: a chat request may ask for the whole
# context, and reserving all of it would serialise the server; retraction covers the rest).
RESERVED_DECODE_TOKENS = 64


@dataclasses.dataclass(frozen=True)
class DecodeTimeouts:
    bootstrap_s: float  # until the prefill server's ranks are known and the handshake sent
    transfer_s: float  # until the KV and the first token are in


class DecodeScheduler(Scheduler):
    # At D > 1 a group waiting on a transfer steps only as often as every other group enters
    # the MLP sync; an idle group napping up to 50 ms would pace its polls (and add to TTFT).
    max_idle_backoff_ms = 2

    def __init__(
        self,
        runner: ModelRunner,
        cfg: SchedulerConfig,
        eos_ids: set[int],
        tokenizer: Callable[[], Any] | None,
        transfer: DecodeTransfer,
        timeouts: DecodeTimeouts,
    ) -> None:
        super().__init__(runner, cfg, eos_ids, tokenizer)
        self.transfer = transfer
        self.timeouts = timeouts
        self.prealloc_queue: list[Req] = []
        self.transfer_queue: list[Req] = []
        self._since: dict[str, float] = {}
        self._first_top: dict[str, list[tuple[float, int]]] = {}
        self.failures: dict[str, str] = {}  # rid -> why it failed (recent ones; tests, logs)
        self.last_prebuilt = 0  # requests the last step's PREBUILT batch turned into running

    @property
    def has_work(self) -> bool:
        return super().has_work or bool(self.prealloc_queue or self.transfer_queue)

    def add_request(self, req: Req) -> None:
        if req.bootstrap is None:
            self._fail(req, "a decode server needs bootstrap_room (use the PD router)")
            return
        super().add_request(req)  # a grammar compiles before the request takes KV slots

    def _admit(self, req: Req) -> None:
        self.prealloc_queue.append(req)

    def abort_request(self, rid: str) -> None:
        for req in [*self.grammars.remove(rid), *self.prealloc_queue]:
            if req.rid == rid:
                self.transfer.cancel(req.bootstrap, "aborted on the decode server")  # type: ignore[arg-type]
                self._finish(req, FinishReason.ABORT)
        for req in self.transfer_queue:
            if req.rid == rid:
                room = req.bootstrap.room  # type: ignore[union-attr]
                self._drop(req, room, "aborted on the decode server")
        self.prealloc_queue = [r for r in self.prealloc_queue if not r.finished]
        self.transfer_queue = [r for r in self.transfer_queue if not r.finished]
        super().abort_request(rid)

    def step(self, shutdown: bool = False) -> SyncDecision:
        decision = super().step(shutdown)
        queues = dict(prealloc=len(self.prealloc_queue), transfer=len(self.transfer_queue))
        self.last_stats = stats_with(self.last_stats, queues, self.transfer.stats)
        if not decision.run_forward and not super().has_work and self.transfer_queue:
            time.sleep(NETWORK_WAIT_S)
        return decision

    def close(self) -> None:
        self.transfer.close()

    # ---- queues ----
    def _next_batch(self) -> ScheduleBatch | None:
        self.last_prebuilt = 0
        self.transfer.flush()
        self._prealloc()
        ready = self._poll_transfer()
        if ready:
            return ScheduleBatch(ForwardMode.PREBUILT, reqs=ready)
        return super()._next_batch()

    def _reserved(self) -> int:
        reqs = [*self.running, *self.transfer_queue]
        left = (r.params.max_new_tokens - len(r.output_ids) for r in reqs)
        return sum(min(n, RESERVED_DECODE_TOKENS) for n in left)

    def _kv_held_elsewhere(self) -> bool:
        # Requests in transfer hold their prompts' slots until they run (and finish).
        return bool(self.transfer_queue)

    def _prealloc(self) -> None:
        """Row + prompt slots for the queue's head, in order, while they fit (identical on every
        rank of the group: same queue, same pool)."""
        pool, rows = self.runner.kv_pool, self.runner.req_to_token
        # Through the prefix cache: an allocation may evict unlocked cached prefixes.
        while self.prealloc_queue:
            req = self.prealloc_queue[0]
            n = len(req.input_ids)
            if n + 1 > min(pool.size, self.runner.context_length):
                self.prealloc_queue.pop(0)
                reason = f"a {n}-token prompt does not fit the decode server's KV cache"
                self.transfer.cancel(req.bootstrap, reason)  # type: ignore[arg-type]
                self._fail(req, reason)
                continue
            need = n + min(req.params.max_new_tokens, RESERVED_DECODE_TOKENS)
            free = self.cache.available_size() - self._reserved()
            if rows.available_size() == 0 or free < need:
                return
            self.prealloc_queue.pop(0)
            req.row = rows.alloc()
            slots = self.cache.alloc(n)
            assert req.row is not None and slots is not None and req.bootstrap is not None
            rows.table[req.row, :n] = slots
            req.kv_len = n  # the prompt's slots belong to the request from now on (freed with it)
            self.transfer.start(req.bootstrap, slots)
            self._since[req.rid] = time.monotonic()
            self.transfer_queue.append(req)

    def _poll_transfer(self) -> list[Req]:
        if not self.transfer_queue:
            return []
        rooms = [r.bootstrap.room for r in self.transfer_queue]  # type: ignore[union-attr]
        now = time.monotonic()
        states: list[KVPoll] = []
        mismatch: dict[int, str] = {}  # room -> why its aux data is not its own
        for req, room, state in zip(self.transfer_queue, rooms, self.transfer.poll(rooms)):
            waited = now - self._since[req.rid]
            limit = (
                self.timeouts.bootstrap_s
                if state is KVPoll.Bootstrapping
                else self.timeouts.transfer_s
            )
            if state < KVPoll.Success and waited > limit:
                state = KVPoll.Failed
            elif state is KVPoll.Success and (got := self.transfer.aux(room).room) != room:
                # Never another request's first token. A local Failed, before the consensus:
                # every rank of the group then drops the request (one rank dropping it alone
                # would leave its queues different from its peers').
                mismatch[room] = f"aux data of room {got} arrived for room {room}"
                state = KVPoll.Failed
            states.append(state)
        agreed = consensus(self.ps, rooms, states)
        failed = [room for room, state in zip(rooms, agreed) if state is KVPoll.Failed]
        local = [mismatch.get(r) or self.transfer.reason(r) for r in failed]
        why = dict(zip(failed, agreed_reasons(self.ps, local)))
        ready, keep = [], []
        for req, state, room in zip(self.transfer_queue, agreed, rooms):
            if state is KVPoll.Success:
                aux = self.transfer.aux(room)
                req.output_ids = [aux.first_token]
                req.output_logprobs = [aux.logprob]
                req.input_logprobs = list(aux.input_logprobs)
                req.input_top_logprobs = list(aux.input_top_logprobs)
                self._first_top[req.rid] = list(aux.top_logprobs)
                if not req.params.greedy:  # the prefill side drew the first token's uniform
                    torch.rand(1, dtype=torch.float64, generator=req.rng())
                self.transfer.release(room)
                self._since.pop(req.rid, None)
                ready.append(req)
            elif state is KVPoll.Failed:
                reason = why[room] or (
                    "the KV transfer failed or timed out (bootstrap "
                    f"{self.timeouts.bootstrap_s} s, transfer {self.timeouts.transfer_s} s)"
                )
                self._drop(req, room, reason)
            else:
                keep.append(req)
        self.transfer_queue = keep
        return ready

    def _drop(self, req: Req, room: int, reason: str) -> None:
        self.transfer.abort(room, reason)
        self._since.pop(req.rid, None)
        self._discard_kv(req)
        self._fail(req, reason)

    def _discard_kv(self, req: Req) -> None:
        """A request whose KV never fully arrived: its slots go straight back to the pool (a
        prefix cache must never keep what they hold)."""
        if req.row is not None:
            rows = self.runner.req_to_token
            self.runner.kv_pool.free(rows.table[req.row, : req.kv_len].clone())
            rows.free(req.row)
        req.row, req.kv_len = None, 0

    def _fail(self, req: Req, reason: str, status: int = 0) -> None:
        log.warning("request %s failed: %s", req.rid, reason)
        self.failures[req.rid] = reason
        if len(self.failures) > 1000:
            self.failures.pop(next(iter(self.failures)))
        self._finish(req, FinishReason.ABORT, emit=False)
        self.outputs.append(aborted(req, reason, status))

    def _fail_grammar(self, req: Req, why: str) -> None:
        self.transfer.cancel(req.bootstrap, why)  # type: ignore[arg-type]
        self._fail(req, why, 400)

    # ---- PREBUILT ----
    def _process_prebuilt(self, batch: ScheduleBatch) -> None:
        self.last_prebuilt = len(batch.reqs)
        start = []
        for req in batch.reqs:
            if req.row is None or not req.output_ids:
                start.append(req)  # the base aborts it: nothing reserved or nothing arrived
                continue
            if req.params.max_new_tokens == 0:  # scoring only: the prompt's logprobs, no token
                req.output_ids, req.output_logprobs = [], []
                self._finish_scored(req)
                continue
            token = req.output_ids[-1]
            reason = self._stop_reason(req, token)
            top = self._first_top.pop(req.rid, [])
            self.outputs.append(
                RequestOutput(
                    req.rid,
                    [token],
                    [req.output_logprobs[-1]] if req.return_logprob else [],
                    reason.value if reason is not None else None,
                    req.matched_stop if reason is not None else None,
                    prompt_tokens=len(req.input_ids),
                    new_top_logprobs=[top[: req.top_logprobs_num]] if req.top_logprobs_num else [],
                    input_logprobs=req.input_logprobs,
                    input_top_logprobs=req.input_top_logprobs,
                )
            )
            if reason is not None:
                self._finish(req, reason, emit=False)
            else:
                start.append(req)
        super()._process_prebuilt(dataclasses.replace(batch, reqs=start))
