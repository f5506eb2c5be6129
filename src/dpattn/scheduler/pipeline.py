"""One rank's scheduler as pipeline stage s of P (docs/design.md §12): micro-batches in flight.

Every stage holds a full replica of its lane's scheduler (same requests, same KV pool size) and
runs, for micro-batch m = 0, 1, 2, ... the same sequence of state changes:

    1. the inputs of m (new requests, aborts, flushes, shutdown): stage 0 takes them from the
       frontend and hands them on with the control message `ctl<m>`;
    2. the result of micro-batch m - P (its sampled tokens): the last stage's own, else the
       output message `out<m-P>`, received from the previous stage (stage 0: around the ring
       from the last) and relayed to the next up to stage P - 2;
    3. schedule m and run the MLP sync over the stage's own groups;
    4. the forward: the hidden rows `act<m>` from the previous stage, to the next one; the last
       stage samples and sends `out<m>` to stage 0.

Since the sequence is identical, so are the stages' decisions (admissions, chunking, retraction,
prefix-cache trees): nothing is negotiated. P micro-batches are in flight, so every stage has
work while the others compute; a request sits in at most one of them (Req.in_flight), while a
long prompt's chunks go into consecutive micro-batches without waiting for any result.

A micro-batch that produces nothing (a middle prefill chunk without logprobs, an idle batch)
sends no output message: `needs_output` is a pure function of the batch, computed by every stage
on its own copy; the receiving side applies a `SkippedResult`, which fails if read. The link
checks each message's tag: `act<m>` carries a digest of the batch the sender ran, so stages that
diverge fail at the next message, naming the stage and the peer, instead of computing garbage.
"""

from __future__ import annotations

import time
import zlib
from collections import deque
from dataclasses import dataclass
from typing import Any

from dpattn.distributed.pipeline import PipelineLink
from dpattn.executor.forward_batch import ForwardMode
from dpattn.messages import RankInput
from dpattn.scheduler.mlp_sync import SyncDecision, batch_to_run
from dpattn.scheduler.schedule_batch import ScheduleBatch
from dpattn.scheduler.scheduler import Scheduler
from dpattn.scheduler.step_result import (
    SkippedResult,
    StepResult,
    forward_stats,
    needs_output,
)


@dataclass
class MicroBatch:
    m: int
    batch: ScheduleBatch | None  # what this rank ran (None: no forward on any rank)
    output: bool  # its output message is sent (else skipped, or there is nothing to send)
    result: StepResult | None = None  # the last stage's own result


@dataclass
class PipelineCounters:
    """Of the micro-batches that ran a real batch: those whose output message went around the
    ring, and those whose message was skipped. Every stage counts a micro-batch when it applies
    its result, so all stages of a lane count the same ones (those in flight at shutdown none)."""

    outputs_sent: int = 0
    outputs_skipped: int = 0
    busy_s: float = 0.0  # time in forwards (the stage's share of the pipeline's work)
    # Wall time of the micro-batches that ran a forward, from taking their inputs to the end
    # of their step: busy_s / active_s is the stage's busy fraction (1 - the pipeline bubble).
    active_s: float = 0.0

    def count(self, output: bool) -> None:
        if output:
            self.outputs_sent += 1
        else:
            self.outputs_skipped += 1


class PipelineStage:
    """Drives `sched` as one stage: `exchange` the inputs, then `step` one micro-batch."""

    def __init__(self, sched: Scheduler, link: PipelineLink) -> None:
        self.sched = sched
        self.link = link
        self.ps = sched.ps
        self.num_stages = link.num_stages
        self.first = link.is_first_stage
        self.last = link.is_last_stage
        self.m = 0  # the micro-batch the next step schedules
        self.in_flight: deque[MicroBatch] = deque()
        self.counters = PipelineCounters()
        # Tests: replaces needs_output on this rank (a skip rule that differs between stages).
        self.output_rule = needs_output
        self._started = 0.0  # when `exchange` began this micro-batch

    # ---- 1. inputs ----
    def exchange(self, msgs: list[RankInput]) -> list[RankInput]:
        """Stage 0 hands its inputs on; a later stage takes them from the previous one (and
        hands them on). Called once per micro-batch, before `step`, on every stage."""
        self._started = time.perf_counter()
        if not self.first:
            msgs = self.link.recv_object(tag=f"ctl{self.m}")
        else:  # decisions taken on stage 0's clock (disaggregation), for the whole lane
            msgs = [*msgs, *self.sched.lane_decisions()]
        if not self.last:
            self.link.send_object(msgs, tag=f"ctl{self.m}")
        return self.sched.apply_lane_decisions(msgs)

    # ---- 2-4. one micro-batch ----
    def step(self, shutdown: bool = False) -> SyncDecision:
        start = time.perf_counter()
        sched, m = self.sched, self.m
        applied: dict[str, float] = {}  # the applied result's grammar stats, on every stage
        if len(self.in_flight) == self.num_stages:
            done = self.in_flight.popleft()
            if done.batch is not None and done.batch.forward_mode is not ForwardMode.IDLE:
                got = self._result(done)
                sched.apply(done.batch, got)
                applied = got.stats if isinstance(got, StepResult) else {}
        batch, decision, sync_s = sched.schedule(shutdown)
        run = batch_to_run(batch, decision, self.ps.rank)
        ran: dict[str, Any] = dict(applied)
        result = None
        if run is not None:
            stats, result = self._forward(m, run)
            ran.update(stats)
        output = self.output_rule(run) and not decision.shutdown  # stage 0 has left the ring
        if self.last and output:
            self.link.send_object(result, tag=f"out{m}")
        self.in_flight.append(MicroBatch(m, run, output, result))
        if run is not None:
            self.counters.active_s += time.perf_counter() - (self._started or start)
        self._started = 0.0
        self.m += 1
        if decision.shutdown:
            self._drain()
        c = self.counters
        ran.update(pp_outputs_sent=c.outputs_sent, pp_outputs_skipped=c.outputs_skipped)
        sched.record_stats(decision, sync_s, time.perf_counter() - start, ran)
        return decision

    def _forward(self, m: int, run: ScheduleBatch) -> tuple[dict[str, Any], StepResult | None]:
        sched, runner, link = self.sched, self.sched.runner, self.link
        fb = run.to_forward_batch()
        plan = runner.gather_plan(fb)
        tag = f"act{m}:{batch_digest(run)}"
        if sched.cfg.debug_lockstep:  # the whole scheduler state, not only the batch
            tag += f":{state_digest(sched)}"
        hidden = None if self.first else link.recv(tag=tag)[0]
        masks = sched.grammars.start_fill(run.reqs, run.sample_mask) if self.last else None
        t0 = time.perf_counter()
        if self.last:
            logits, prompt = runner.forward_with_logprobs(fb, plan, hidden)
        else:
            link.send([runner.forward_hidden(fb, hidden, plan)], tag=tag)
        forward_s = time.perf_counter() - t0
        self.counters.busy_s += forward_s
        sched.after_forward(run)
        result = None
        if self.last and self.output_rule(run):
            result = sched.sample(run, logits, prompt, masks)
        return forward_stats(run, plan.total, plan.mode.value, forward_s), result

    def _result(self, done: MicroBatch) -> StepResult | SkippedResult:
        """Micro-batch done.m's result on this stage: its own (last), or the output message
        from the previous stage, relayed on until stage P - 2 (stage P - 1 made it)."""
        self.counters.count(done.output)
        if not done.output:
            return SkippedResult(f"micro-batch {done.m}")
        if self.last:
            assert done.result is not None  # sampled whenever the output rule holds
            return done.result
        result: StepResult = self.link.recv_object(tag=f"out{done.m}")
        if self.link.stage < self.num_stages - 2:
            self.link.send_object(result, tag=f"out{done.m}")
        return result

    def _drain(self) -> None:
        """Shutdown: stage 0 takes the output messages still on their way (their sends must
        complete before the ranks leave); nobody relays them any more."""
        if self.first:
            for mb in list(self.in_flight)[:-1]:  # the last one, the shutdown's, sent nothing
                if mb.output:
                    self.link.recv_object(tag=f"out{mb.m}")
        self.in_flight.clear()
        self.link.flush()


def batch_digest(batch: ScheduleBatch) -> str:
    """A short fingerprint of what a stage runs: stages that scheduled differently disagree."""
    key = (
        batch.forward_mode.value,
        [r.rid for r in batch.reqs],
        batch.positions[:1] + batch.positions[-1:],
        batch.num_tokens,
        int(batch.out_cache_loc.sum()),
    )
    return f"{zlib.crc32(repr(key).encode()):08x}"


def state_digest(sched: Scheduler) -> str:
    """A fingerprint of a scheduler's state: the stages of a lane hold the same one whenever
    they are at the same point of the same micro-batch (tests, and --debug-lockstep)."""
    reqs = [*sched.waiting, *sched.running, *([sched.chunked] if sched.chunked else [])]
    key = (
        [(r.rid, r.kv_len, len(r.output_ids), r.in_flight, r.finished) for r in reqs],
        [r.rid for r in sched.running],
        sched.num_landing,
        sched.num_retractions,
        sched.cache.available_size(),
        sched.cache.cached_size(),
    )
    return f"{zlib.crc32(repr(key).encode()):08x}"
