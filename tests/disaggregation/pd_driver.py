"""One rank of one side (prefill, decode or colocated) of the disaggregation tests: adds its
requests when they arrive, aborts them on cue, steps the real scheduler, and records queues,
outputs and pools. Cross-side cues are threading events (both worlds run in this process);
every decision that changes a queue is taken from world-gathered values, so the ranks of a
group stay in lock-step."""

from __future__ import annotations

import itertools
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dpattn.config import EngineConfig
from dpattn.disaggregation.decode import DecodeScheduler
from dpattn.disaggregation.factory import build_scheduler
from dpattn.disaggregation.prefill import PrefillScheduler
from dpattn.distributed.parallel_state import ParallelState
from dpattn.executor.model_runner import ModelRunner
from dpattn.executor.sampling_params import SamplingParams
from dpattn.messages import BootstrapInfo
from dpattn.scheduler.schedule_batch import Req, ScheduleBatch
from dpattn.scheduler.scheduler import Scheduler

TIME_LIMIT_S = 90.0  # a side still busy then is stuck: fail, never hang
Wrap = Callable[[ParallelState, Any], Any]
Events = dict[str, threading.Event]


@dataclass(frozen=True)
class Spec:
    rid: str
    prompt: tuple[int, ...]
    max_new_tokens: int
    room: int
    arrival: int = 0  # step (on each side) at whose start the request arrives
    decode_group: int = 0  # decode DP group key (% dp)
    stop_token_ids: tuple[int, ...] = ()
    # Decode side: arrival counts from the step `after` (a rid) was first running on any rank.
    after: str | None = None
    # Arrival counts from the step this side first saw the event (set by the other side:
    # "decode-added:RID", "decode-aborted:RID", "prefill-aborted:RID", ...).
    prefill_waits_for: str | None = None
    decode_waits_for: str | None = None
    # Aborts: steps after arrival (0: before its first step), after leaving the prefill's
    # bootstrap queue, or once the decode side sent that many tokens.
    abort_prefill_at: int | None = None
    abort_prefill_after_bootstrap: int | None = None
    abort_decode_at: int | None = None
    abort_decode_after_tokens: int | None = None
    only_decode: bool = False  # the prefill server never hears of it
    temperature: float = 0.0
    seed: int = 0

    def req(self, port: int | None, prefill: bool = False) -> Req:
        params = SamplingParams(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            ignore_eos=True,
            stop_token_ids=list(self.stop_token_ids),
        )
        boot = None if port is None else BootstrapInfo("127.0.0.1", port, self.room)
        return Req(self.rid, list(self.prompt), params, self.seed, True, bootstrap=boot)


@dataclass
class Result:
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass(frozen=True)
class PrebuiltStep:
    """A decode step whose batch was PREBUILT: what ran, and where the gather metadata went."""

    mode: str  # the forward mode run ("none": no forward on this rank)
    idle: bool  # the run was an idle batch (the PREBUILT batch's inner one)
    global_num_tokens: tuple[int, ...]
    padded_tokens: int  # B of the forward's gather plan (0: no forward)
    padding_mode: str
    own_meta: list[int] | None  # global_num_tokens written on the PREBUILT batch itself
    inner_meta: list[int] | None  # ... on its inner idle batch (None: no inner batch)
    has_inner: bool
    running: int  # requests running after the step (the PREBUILT ones included)


@dataclass
class SideRun:
    rank: int
    dp_rank: int
    outputs: dict[str, Result]
    queues: list[tuple[Any, ...]]  # per step: the rids of every queue of this rank
    kv: tuple[int, int]  # (free after, initial)
    rows: tuple[int, int]
    prebuilt_steps: list[PrebuiltStep] = field(default_factory=list)
    local_states: list[dict[str, int]] = field(default_factory=list)  # per step (wrapped only)
    failures: dict[str, str] = field(default_factory=dict)
    retractions: int = 0  # running requests sent back to wait for lack of KV slots


def _queues(sched: Scheduler) -> tuple[Any, ...]:
    base = ([r.rid for r in sched.waiting], [r.rid for r in sched.running])
    if isinstance(sched, PrefillScheduler):
        extra = (sched.bootstrap_queue, sched.inflight_queue)
    elif isinstance(sched, DecodeScheduler):
        extra = (sched.prealloc_queue, sched.transfer_queue)
    else:
        extra = ()
    return (*base, *([r.rid for r in q] for q in extra))


def free_slots(sched: Scheduler) -> int:
    sched.flush_cache()  # a prefix cache keeps finished prompts: drop them to count
    return sched.runner.kv_pool.available_size()


class Driver:
    def __init__(
        self, ps: ParallelState, sched: Scheduler, specs: tuple[Spec, ...], port: int | None,
        side: str, events: Events, serve_until: str | None = None,
    ) -> None:  # fmt: skip
        self.ps, self.sched, self.side, self.port, self.events = ps, sched, side, port, events
        self.serve_until = serve_until
        group = (lambda s: s.room) if side == "prefill" else (lambda s: s.decode_group)
        self.specs = [
            s
            for s in specs
            if group(s) % ps.dp_size == ps.dp_rank and not (s.only_decode and side == "prefill")
        ]
        self.all_specs = specs
        self.outputs: dict[str, Result] = {}
        self.added: dict[str, int] = {}
        self.left_bootstrap: dict[str, int] = {}
        self.gate_step: dict[str, int] = {}  # rid -> step its waits_for event / `after` fired

    def waits(self, s: Spec) -> str | None:
        if self.side == "prefill":
            return s.prefill_waits_for
        if self.side == "decode":
            return s.decode_waits_for or (s.after and f"running:{s.after}")
        return None

    def open_gates(self, step: int) -> None:
        """Which awaited events fired, as rank 0 of the world saw them: every rank of the
        world agrees (gate_step covers all specs), so the queues stay in lock-step."""
        pending = [s for s in self.all_specs if self.waits(s) and s.rid not in self.gate_step]
        if not pending:
            return
        seen = sorted(s.rid for s in pending if self.events[self.waits(s) or ""].is_set())
        for rid in self.ps.world_cpu.all_gather_object(seen)[0]:
            self.gate_step.setdefault(rid, step)

    def arrives(self, s: Spec, step: int) -> bool:
        if self.waits(s) is None:
            return s.arrival == step
        return s.rid in self.gate_step and step == self.gate_step[s.rid] + s.arrival

    def aborts(self, s: Spec, step: int) -> bool:
        if s.rid not in self.added or self.outputs[s.rid].finish_reason is not None:
            return False
        since = step - self.added[s.rid]
        if self.side == "prefill":
            left = self.left_bootstrap.get(s.rid)
            return s.abort_prefill_at == since or (
                left is not None and s.abort_prefill_after_bootstrap == step - left
            )
        if self.side == "decode":
            n = s.abort_decode_after_tokens
            return s.abort_decode_at == since or (
                n is not None and len(self.outputs[s.rid].ids) >= n
            )
        return False

    def before_step(self, step: int) -> None:
        self.open_gates(step)
        for s in self.specs:
            if self.arrives(s, step):
                self.sched.add_request(s.req(self.port))
                self.outputs[s.rid] = Result()
                self.added[s.rid] = step
                self.events[f"{self.side}-added:{s.rid}"].set()
            if self.aborts(s, step):
                self.sched.abort_request(s.rid)
                self.events[f"{self.side}-aborted:{s.rid}"].set()

    def after_step(self, step: int) -> None:
        sched = self.sched
        if isinstance(sched, PrefillScheduler):
            queued = {r.rid for r in sched.bootstrap_queue}
            for rid in self.added:
                if rid not in queued and rid not in self.left_bootstrap:
                    self.left_bootstrap[rid] = step
                    self.events[f"prefill-left-bootstrap:{rid}"].set()
        for r in sched.running:
            self.events[f"running:{r.rid}"].set()
        for o in sched.take_outputs():
            res = self.outputs[o.rid]
            assert res.finish_reason is None, f"{o.rid}: output after it finished"
            res.ids += o.new_ids
            res.logprobs += o.new_logprobs
            res.finish_reason = o.finish_reason
            if o.finish_reason is not None:
                self.events[f"{self.side}-done:{o.rid}"].set()

    @property
    def serving(self) -> bool:
        """Still up for the other side (a server stays up: it answers late handshakes)."""
        return self.serve_until is not None and not self.events[self.serve_until].is_set()

    def done(self) -> bool:
        """Every rank of the world: nothing queued, nothing still to arrive, nobody served."""
        to_come = any(s.rid not in self.outputs for s in self.specs)
        busy = self.ps.world_cpu.all_gather_object(self.sched.has_work or to_come or self.serving)
        return not any(busy)


def drive_side(
    ps: ParallelState,
    cfg: EngineConfig,
    specs: tuple[Spec, ...],
    port: int | None,
    side: str,
    wrap: Wrap | None = None,
    events: Events | None = None,
    stop_at: int | None = None,
    peer: str | None = None,
) -> SideRun:
    """Runs until every request of the world ended (or `stop_at` steps: the side "dies").

    With a `peer` side, this side takes its first step once the peer is built (each side's
    clocks, such as the prefill's bootstrap timeout, must not count the other's start-up) and
    stays up, stepping idle, until the peer has ended, as a server does. Each side signals
    "SIDE-ready" and "SIDE-finished" for that."""
    events = events if events is not None else defaultdict(threading.Event)
    try:
        return _drive(ps, cfg, specs, port, side, wrap, events, stop_at, peer)
    finally:  # also when this side failed: the peer must not wait for it
        events[f"{side}-ready"].set()
        events[f"{side}-finished"].set()


def _drive(
    ps: ParallelState,
    cfg: EngineConfig,
    specs: tuple[Spec, ...],
    port: int | None,
    side: str,
    wrap: Wrap | None,
    events: Events,
    stop_at: int | None,
    peer: str | None,
) -> SideRun:
    if cfg.scheduler.debug_lockstep:
        ps.set_lockstep(True)
    runner = ModelRunner(cfg.runner, ps)
    sched = build_scheduler(cfg, runner, eos_ids=set())
    if wrap is not None:  # a test's view of (or delay on) the real transfer
        sched.transfer = wrap(ps, sched.transfer)  # type: ignore[attr-defined]
    kv0, rows0 = runner.kv_pool.available_size(), runner.req_to_token.available_size()
    seen: list[ScheduleBatch] = []  # the step's PREBUILT batch, as the scheduler processed it
    if isinstance(sched, DecodeScheduler):
        process = sched._process_prebuilt

        def spy(batch: ScheduleBatch) -> None:
            seen.append(batch)
            process(batch)

        sched._process_prebuilt = spy  # type: ignore[method-assign]
    drv = Driver(ps, sched, specs, port, side, events, peer and f"{peer}-finished")
    run = SideRun(ps.rank, ps.dp_rank, drv.outputs, [], (0, kv0), (0, rows0))
    events[f"{side}-ready"].set()
    try:
        if peer is not None and not events[f"{peer}-ready"].wait(TIME_LIMIT_S):
            raise AssertionError(f"{side} rank {ps.rank}: the {peer} side never started")
        deadline = time.monotonic() + TIME_LIMIT_S
        for step in itertools.count():
            if time.monotonic() > deadline:
                open_rids = [rid for rid, r in drv.outputs.items() if r.finish_reason is None]
                raise AssertionError(  # what was stuck where: (waiting, running, side queues)
                    f"{side} rank {ps.rank}: not done in {TIME_LIMIT_S} s; queues "
                    f"{_queues(sched)}, unfinished {open_rids}, step {step}"
                )
            if stop_at is not None and step >= stop_at:
                return run
            drv.before_step(step)
            sched.step()
            stats = sched.last_stats
            if seen:
                batch = seen.pop()
                inner = batch.inner_idle_batch
                run.prebuilt_steps.append(
                    PrebuiltStep(
                        stats.forward_mode,
                        stats.idle_batch,
                        stats.global_num_tokens,
                        stats.padded_tokens,
                        stats.padding_mode,
                        batch.global_num_tokens,
                        inner.global_num_tokens if inner is not None else None,
                        inner is not None,
                        stats.running,
                    )
                )
            if wrap is not None:
                run.local_states.append(dict(getattr(sched.transfer, "last", {})))
            run.queues.append(_queues(sched))
            drv.after_step(step)
            if step % 8 == 0 and drv.done():
                break
            if not sched.has_work and drv.serving:
                time.sleep(0.002)  # idle, up for the peer: leave the cores to it
        run.kv = (free_slots(sched), kv0)
        run.rows = (runner.req_to_token.available_size(), rows0)
        run.failures = dict(getattr(sched, "failures", {}))
        run.retractions = sched.num_retractions
        return run
    finally:
        sched.close()
