"""A prefill server with pipeline stages (--pp-size P > 1, docs/design.md §8).

Every stage runs a replica of the lane's PrefillScheduler (scheduler/pipeline.py), so the queue
moves must be identical on all stages, while what they depend on is local timing: when the
decode side's handshake reached a rank, when a send finished or failed. Hence:

- **Stage 0 decides for its lane.** At the start of each micro-batch stage 0 polls its transfers
  (bootstrap and inflight queues, agreed over its attention-TP group as without stages) and puts
  the outcome, a `LaneDecisions`, into the micro-batch's control message; every stage, stage 0
  included, applies it at the same point (before the micro-batch's other inputs). A later
  stage's own transfer states are never consulted for a queue move.
- **Handshakes go to stage 0 only** and ride the decision that admits the request: each later
  stage's rank `adopt`s its lane's KVInit (same targets: they depend on the attention-TP rank
  only), before the request can be scheduled anywhere.
- **Each stage sends its own layers' KV** right after its own forward of each prefill chunk
  (`after_forward`), and its own aux (first token, logprobs) when it applies the result of the
  prompt's last chunk: every stage applies it, P micro-batches after that chunk. The decode side
  counts each (stage, rank) source's chunks against its aux, and completes the request when
  every stage's sources are in.
- **Release is safe without hearing from later stages.** A release decided in micro-batch m'
  reaches stage s in its control message of m', after stage s ran every micro-batch before m':
  its forward of the last chunk (KV sent) and the apply of its result (aux sent), both earlier.
  Sends copy the KV out synchronously, so freed slots are never read later.
- **Faults.** A later stage whose send fails tells the decode side (KVAbort to its targets);
  the decode side then fails the request and cancels it at every prefill rank of the group,
  stage 0's included, which fails it for the lane. Aborts arrive in the control message, so they
  are identical on every stage already.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from dpattn.disaggregation.prefill import PrefillScheduler
from dpattn.disaggregation.states import NETWORK_WAIT_S, stats_with
from dpattn.disaggregation.wire import KVInit
from dpattn.scheduler.mlp_sync import SyncDecision
from dpattn.scheduler.schedule_batch import ScheduleBatch
from dpattn.scheduler.step_result import SkippedResult, StepResult


@dataclass(frozen=True)
class LaneDecisions:
    """Stage 0's agreed queue moves for one micro-batch, applied by every stage of its lane."""

    admitted: tuple[str, ...]  # bootstrap queue -> waiting (rids, in queue order)
    inits: tuple[KVInit | None, ...]  # the handshake of each, as this lane's stage-0 rank got it
    failed: tuple[tuple[str, str], ...]  # bootstrap queue: (rid, why)
    sent: tuple[str, ...]  # inflight: delivered, their KV is freed
    lost: tuple[tuple[str, str], ...]  # inflight: (rid, why the send failed)


class PipelinedPrefillScheduler(PrefillScheduler):
    """PrefillScheduler as one pipeline stage: PipelineStage calls schedule / after_forward /
    sample / apply (never `step`), and the lane hooks carry stage 0's decisions."""

    def lane_decisions(self) -> list[Any]:
        if not self.ps.is_first_stage:
            return []
        ready, failed = self._bootstrap_decisions()
        sent, lost = self._inflight_decisions()
        if not (ready or failed or sent or lost):
            return []  # nothing to apply: the control message stays as it was
        rooms = {r.rid: r.bootstrap.room for r in self.bootstrap_queue if r.bootstrap}
        inits = tuple(self.transfer.handshake(rooms[rid]) for rid in ready)
        return [
            LaneDecisions(
                tuple(ready), inits, tuple(failed.items()), tuple(sent), tuple(lost.items())
            )
        ]

    def apply_lane_decisions(self, msgs: list[Any]) -> list[Any]:
        if not self.ps.is_first_stage:
            # Read the decode side's aborts (a room it gave up): this rank stops sending it.
            self.transfer.poll_bootstrap([])
        rest = []
        for msg in msgs:
            if not isinstance(msg, LaneDecisions):
                rest.append(msg)
                continue
            if not self.ps.is_first_stage:
                rooms = {r.rid: r.bootstrap.room for r in self.bootstrap_queue if r.bootstrap}
                for rid, init in zip(msg.admitted, msg.inits):
                    self.transfer.adopt(rooms[rid], init)
            self._apply_bootstrap(list(msg.admitted), dict(msg.failed))
            self._apply_inflight(list(msg.sent), dict(msg.lost))
        return rest

    def after_forward(self, batch: ScheduleBatch) -> None:
        """This stage's layers of the chunk are computed: their KV goes out now, overlapping
        the next chunks (the later stages send theirs after their own forwards)."""
        super().after_forward(batch)
        if batch.forward_mode.is_extend_like():
            for req in batch.reqs:
                self._send_kv(req)

    def apply(self, batch: ScheduleBatch, result: StepResult | SkippedResult) -> None:
        """The first token reached this stage: its finished prompts send their aux data (after
        their KV) and wait in the inflight queue for stage 0's release."""
        super().apply(batch, result)
        self._send()

    def record_stats(
        self, decision: SyncDecision, sync_s: float, step_s: float, ran: dict[str, Any]
    ) -> None:
        super().record_stats(decision, sync_s, step_s, ran)
        queues = dict(
            bootstrap=len(self.bootstrap_queue),
            waiting=len(self.waiting),
            inflight=len(self.inflight_queue),
        )
        self.last_stats = stats_with(self.last_stats, queues, self.transfer.stats)
        idle = not decision.run_forward and not (self.waiting or self.running or self.chunked)
        if idle and not self.num_landing and self.bootstrap_queue:
            time.sleep(NETWORK_WAIT_S)  # only handshakes awaited: no spinning micro-batches
