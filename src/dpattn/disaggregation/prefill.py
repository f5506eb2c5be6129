"""The prefill server's scheduler: bootstrap queue -> waiting queue -> forward -> inflight queue.

A request waits in the bootstrap queue until the decode side's handshake reached every rank of
its DP group (states agreed over attention-TP), is then prefilled like any other (the usual MLP
sync, idle batches, chunked prefill), samples its first token, and goes to the inflight queue
while its KV and the aux data (first token, logprobs, room) are sent; its KV is freed once the
send is done on every rank. The prefill server's own client gets the first token and the end.
With pipeline stages the same queues are driven per micro-batch, stage 0 deciding every queue
move for its lane (prefill_pipeline.py): hence each poll is split in a decision and its apply.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from dpattn.config import SchedulerConfig
from dpattn.disaggregation.states import (
    NETWORK_WAIT_S,
    KVPoll,
    aborted,
    agreed_reasons,
    consensus,
    stats_with,
)
from dpattn.disaggregation.transfer import PrefillTransfer
from dpattn.disaggregation.wire import KVAux
from dpattn.executor.model_runner import ModelRunner
from dpattn.scheduler.mlp_sync import SyncDecision
from dpattn.scheduler.schedule_batch import FinishReason, Req
from dpattn.scheduler.scheduler import Scheduler

log = logging.getLogger(__name__)


class PrefillScheduler(Scheduler):
    # At D > 1 a group waiting for handshakes steps only as often as every other group enters
    # the MLP sync: idle groups nap at most this long (decode.py says the same).
    max_idle_backoff_ms = 2

    def __init__(
        self,
        runner: ModelRunner,
        cfg: SchedulerConfig,
        eos_ids: set[int],
        tokenizer: Callable[[], Any] | None,
        transfer: PrefillTransfer,
        bootstrap_timeout_s: float,
    ) -> None:
        super().__init__(runner, cfg, eos_ids, tokenizer)
        self.transfer = transfer
        self.bootstrap_timeout_s = bootstrap_timeout_s
        self.bootstrap_queue: list[Req] = []
        self.inflight_queue: list[Req] = []
        self._to_send: list[Req] = []  # finished by this step's forward: sent after it
        self._since: dict[str, float] = {}
        self._sent_upto: dict[str, int] = {}  # rid -> prompt positions whose KV went out

    @property
    def has_work(self) -> bool:
        return super().has_work or bool(self.bootstrap_queue or self.inflight_queue)

    def add_request(self, req: Req) -> None:
        if req.bootstrap is None:
            log.warning("%s: a prefill server needs bootstrap_room (use the PD router)", req.rid)
            super()._finish(req, FinishReason.ABORT)
            return
        # The prefill side samples the first token only; the decode side owns the stop rules.
        req.params = dataclasses.replace(req.params, max_new_tokens=1)
        self._since[req.rid] = time.monotonic()
        self.bootstrap_queue.append(req)

    def abort_request(self, rid: str) -> None:
        for req in self.bootstrap_queue:
            if req.rid == rid:
                self._fail(req, "aborted on the prefill server")
        self.bootstrap_queue = [r for r in self.bootstrap_queue if not r.finished]
        for req in [r for r in self.inflight_queue if r.rid == rid]:
            self._release(req, "aborted on the prefill server")
        super().abort_request(rid)  # waiting / chunked: _finish tells the decode side

    def step(self, shutdown: bool = False) -> SyncDecision:
        self._poll_bootstrap()
        decision = super().step(shutdown)
        self._send()
        self._poll_inflight()
        queues = dict(
            bootstrap=len(self.bootstrap_queue),
            waiting=len(self.waiting),
            inflight=len(self.inflight_queue),
        )
        self.last_stats = stats_with(self.last_stats, queues, self.transfer.stats)
        if not decision.run_forward and not super().has_work and self.bootstrap_queue:
            time.sleep(NETWORK_WAIT_S)
        return decision

    def close(self) -> None:
        self.transfer.close()

    # ---- queues ----
    def _poll_bootstrap(self) -> None:
        self._apply_bootstrap(*self._bootstrap_decisions())

    def _bootstrap_decisions(self) -> tuple[list[str], dict[str, str]]:
        """(rids whose handshake reached every rank of the group, {rid: why it failed}), agreed
        over attention-TP; the queue itself is left as it is (`_apply_bootstrap`)."""
        if not self.bootstrap_queue:
            # Still read the decode side's messages: a handshake for a room given up here (no
            # handshake in time, an abort) is answered with its reason now. Unread, the decode
            # request waited out its transfer timeout. Local only: no collective.
            self.transfer.poll_bootstrap([])
            return [], {}
        now = time.monotonic()
        rooms = _rooms(self.bootstrap_queue)
        states = self.transfer.poll_bootstrap(rooms)
        states = [
            KVPoll.Failed
            if s < KVPoll.WaitingForInput and now - self._since[r.rid] > self.bootstrap_timeout_s
            else s
            for r, s in zip(self.bootstrap_queue, states)
        ]
        agreed = consensus(self.ps, rooms, states, "bootstrap")
        failed = [r for r, s in zip(self.bootstrap_queue, agreed) if s is KVPoll.Failed]
        local = [self.transfer.reason(room) for room in _rooms(failed)]
        timeout = f"no handshake from the decode server within {self.bootstrap_timeout_s} s"
        why = {r.rid: w or timeout for r, w in zip(failed, agreed_reasons(self.ps, local))}
        ready = [r.rid for r, s in zip(self.bootstrap_queue, agreed) if s >= KVPoll.WaitingForInput]
        return ready, why

    def _apply_bootstrap(self, ready: list[str], failed: dict[str, str]) -> None:
        """Moves the decided requests on, in queue order: to waiting, or failed."""
        keep = []
        admitted = set(ready)
        for req in self.bootstrap_queue:
            if req.rid in failed:
                self._fail(req, failed[req.rid])
            elif req.rid in admitted:
                self._since.pop(req.rid, None)
                super().add_request(req)  # waits for its grammar, if it has one
            else:
                keep.append(req)
        self.bootstrap_queue = keep

    def _send(self) -> None:
        """KV computed this step goes out now (a chunked prompt's too, overlapping its next
        chunks); a request whose first token this step sampled then gets its aux data."""
        if self.chunked is not None:
            self._send_kv(self.chunked)
        tops = {o.rid: o.new_top_logprobs for o in self.outputs if o.new_ids}
        for req in self._to_send:
            assert req.bootstrap is not None
            self._send_kv(req)
            top = tops.get(req.rid) or [[]]
            aux = KVAux(
                req.bootstrap.room,
                self.ps.attn_tp_rank,
                0,
                req.output_ids[0],
                req.output_logprobs[0],
                top[0],
                list(req.input_logprobs),
                list(req.input_top_logprobs),
            )
            self.transfer.send_aux(req.bootstrap.room, aux)
            self._sent_upto.pop(req.rid, None)
            self.inflight_queue.append(req)
        self._to_send = []

    def _send_kv(self, req: Req) -> None:
        start = self._sent_upto.get(req.rid, 0)
        end = min(req.kv_len, len(req.input_ids))
        if req.row is None or req.bootstrap is None or end <= start:
            return
        slots = self.runner.req_to_token.table[req.row, start:end].clone()
        self.transfer.send_kv(req.bootstrap.room, self.runner.kv_pool, slots, start)
        self._sent_upto[req.rid] = end

    def _poll_inflight(self) -> None:
        self._apply_inflight(*self._inflight_decisions())

    def _inflight_decisions(self) -> tuple[list[str], dict[str, str]]:
        """(rids delivered by every rank of the group, {rid: why the send failed}), agreed over
        attention-TP; the queue itself is left as it is (`_apply_inflight`)."""
        if not self.inflight_queue:
            return [], {}
        rooms = _rooms(self.inflight_queue)
        states = consensus(self.ps, rooms, self.transfer.poll_sent(rooms), "inflight")
        sent = [r.rid for r, s in zip(self.inflight_queue, states) if s is KVPoll.Success]
        lost = {
            req.rid: self.transfer.reason(room)
            or "the KV send failed on another rank of this group"
            for req, room, s in zip(self.inflight_queue, rooms, states)
            if s is KVPoll.Failed
        }
        return sent, lost

    def _apply_inflight(self, sent: list[str], lost: dict[str, str]) -> None:
        keep = []
        done = set(sent)
        for req in list(self.inflight_queue):
            if req.rid in done:
                self._free_kv(req)
                self.transfer.release(req.bootstrap.room)  # type: ignore[union-attr]
            elif req.rid in lost:
                self._release(req, lost[req.rid])
            else:
                keep.append(req)
        self.inflight_queue = keep

    # ---- ends ----
    def _finish(self, req: Req, reason: FinishReason, emit: bool = True) -> None:
        if reason is not FinishReason.ABORT and req.bootstrap is not None and req.output_ids:
            # The first token is out: the KV stays until the decode side has it.
            req.finish_reason = reason
            self._to_send.append(req)
            return
        if req.bootstrap is not None:
            self.transfer.abort(req.bootstrap.room, "aborted on the prefill server")
        self._sent_upto.pop(req.rid, None)
        super()._finish(req, reason, emit)

    def _fail(self, req: Req, reason: str, status: int = 0) -> None:
        log.warning("request %s failed: %s", req.rid, reason)
        assert req.bootstrap is not None
        self._since.pop(req.rid, None)
        self.transfer.abort(req.bootstrap.room, reason)
        super()._finish(req, FinishReason.ABORT, emit=False)
        self.outputs.append(aborted(req, reason, status))

    def _fail_grammar(self, req: Req, why: str) -> None:
        self._fail(req, why, 400)  # the decode side hears why too

    def _release(self, req: Req, reason: str) -> None:
        """An inflight request given up: its client already has the first token and the end."""
        log.warning("request %s: KV not delivered: %s", req.rid, reason)
        assert req.bootstrap is not None
        self.transfer.abort(req.bootstrap.room, reason)
        self._free_kv(req)
        self.inflight_queue = [r for r in self.inflight_queue if r is not req]


def _rooms(reqs: list[Req]) -> list[int]:
    return [r.bootstrap.room for r in reqs if r.bootstrap is not None]
