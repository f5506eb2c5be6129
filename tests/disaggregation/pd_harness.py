"""Drives a prefill world and a decode world of rank threads side by side (no frontend, no HTTP
routes): each rank runs the real PrefillScheduler / DecodeScheduler with the zmq transfer, and the
prefill ranks register with a real bootstrap service. Also the colocated reference run."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpattn.config import EngineConfig
from dpattn.disaggregation.bootstrap import BootstrapServer
from dpattn.disaggregation.decode import DecodeScheduler
from dpattn.disaggregation.factory import build_scheduler
from dpattn.disaggregation.prefill import PrefillScheduler
from dpattn.distributed.parallel_state import Layout, ParallelState
from dpattn.executor.model_runner import ModelRunner
from dpattn.executor.sampling_params import SamplingParams
from dpattn.messages import BootstrapInfo
from dpattn.runtime.launch import RankGroup
from dpattn.scheduler.schedule_batch import Req
from dpattn.scheduler.scheduler import Scheduler

MAX_STEPS = 3000
POOL = 256


@dataclass(frozen=True)
class Spec:
    rid: str
    prompt: tuple[int, ...]
    max_new_tokens: int
    room: int
    arrival: int = 0  # step (on each side) at whose start the request arrives
    decode_group: int = 0  # decode DP group key (% dp)
    abort_prefill_at: int | None = None  # step at which the prefill side aborts it
    abort_decode_at: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    # Decode side: arrival counts from the step `after` (a rid) was first running on any rank.
    after: str | None = None

    def req(self, port: int | None, prefill: bool = False) -> Req:
        params = SamplingParams(
            max_new_tokens=self.max_new_tokens,
            temperature=0,
            ignore_eos=True,
            stop_token_ids=list(self.stop_token_ids),
        )
        boot = None if port is None else BootstrapInfo("127.0.0.1", port, self.room)
        return Req(self.rid, list(self.prompt), params, 0, True, bootstrap=boot)


def workload(seed: int, n: int, max_prompt: int = 20, max_new: int = 6) -> tuple[Spec, ...]:
    rng = random.Random(seed)
    return tuple(
        Spec(
            f"r{seed}-{i}",
            tuple(rng.randrange(3, 500) for _ in range(rng.randint(1, max_prompt))),
            rng.randint(1, max_new),
            rng.getrandbits(63),
            arrival=rng.randrange(4),
            decode_group=rng.randrange(8),
        )
        for i in range(n)
    )


@dataclass
class Result:
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class SideRun:
    rank: int
    dp_rank: int
    outputs: dict[str, Result]
    queues: list[tuple[Any, ...]]  # per step: the rids of every queue of this rank
    kv: tuple[int, int]  # (free after, initial)
    rows: tuple[int, int]
    # steps whose batch was PREBUILT: (forward_mode run, idle batch, global_num_tokens)
    prebuilt_steps: list[tuple[str, bool, tuple[int, ...]]] = field(default_factory=list)
    local_states: list[dict[str, int]] = field(default_factory=list)  # per step (wrapped only)
    failures: dict[str, str] = field(default_factory=dict)


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
    flush = getattr(sched, "flush_cache", None)
    if flush is not None:  # a prefix cache keeps finished prompts: drop them to count
        flush()
    return sched.runner.kv_pool.available_size()


Wrap = Callable[[ParallelState, Any], Any]


def drive_side(
    ps: ParallelState,
    cfg: EngineConfig,
    specs: tuple[Spec, ...],
    port: int | None,
    side: str,
    wrap: Wrap | None = None,
) -> SideRun:
    if cfg.scheduler.debug_lockstep:
        ps.set_lockstep(True)
    runner = ModelRunner(cfg.runner, ps)
    sched = build_scheduler(cfg, runner, eos_ids=set())
    if wrap is not None:  # a test's view of (or delay on) the real transfer
        sched.transfer = wrap(ps, sched.transfer)  # type: ignore[attr-defined]
    kv0, rows0 = runner.kv_pool.available_size(), runner.req_to_token.available_size()
    dp = ps.dp_size

    def mine(s: Spec) -> bool:
        group = s.room % dp if side == "prefill" else s.decode_group % dp
        return group == ps.dp_rank

    outputs: dict[str, Result] = {}
    queues: list[tuple[Any, ...]] = []
    prebuilt: list[tuple[str, bool, tuple[int, ...]]] = []
    local_states: list[dict[str, int]] = []
    last = max(s.arrival for s in specs) + 8
    gates = {s.after for s in specs if s.after is not None and side == "decode"}
    opened: dict[str, int] = {}  # gate rid -> the step it was first seen running

    def arrives(s: Spec, step: int) -> bool:
        if s.after is None or side != "decode":
            return s.arrival == step
        return s.after in opened and s.arrival == step - opened[s.after]

    try:
        for step in range(MAX_STEPS):
            if gates - set(opened):  # harness only: a world-wide look at who runs
                seen = ps.world_cpu.all_gather_object([r.rid for r in sched.running])
                for rid in gates & {rid for rids in seen for rid in rids}:
                    opened.setdefault(rid, step)
            for s in specs:
                if mine(s) and arrives(s, step):
                    sched.add_request(s.req(port, side == "prefill"))
                    outputs[s.rid] = Result()
                abort_at = s.abort_prefill_at if side == "prefill" else s.abort_decode_at
                if mine(s) and abort_at == step:
                    sched.abort_request(s.rid)
            sched.step()
            stats = sched.last_stats
            if isinstance(sched, DecodeScheduler) and sched.last_prebuilt:
                prebuilt.append((stats.forward_mode, stats.idle_batch, stats.global_num_tokens))
            if wrap is not None:
                local_states.append(dict(getattr(sched.transfer, "last", {})))  # type: ignore[attr-defined]
            queues.append(_queues(sched))
            for o in sched.take_outputs():
                res = outputs[o.rid]
                assert res.finish_reason is None, f"{o.rid}: output after it finished"
                res.ids += o.new_ids
                res.logprobs += o.new_logprobs
                res.finish_reason = o.finish_reason
            if step >= last:
                to_come = any(mine(s) and s.rid not in outputs for s in specs)
                busy = ps.world_cpu.all_gather_object(sched.has_work or to_come)
                if not any(busy):
                    break
        else:
            raise AssertionError(f"{side} rank {ps.rank}: not done in {MAX_STEPS} steps")
        kv = (free_slots(sched), kv0)
    finally:
        sched.close()
    failures = getattr(sched, "failures", {})
    return SideRun(
        ps.rank,
        ps.dp_rank,
        outputs,
        queues,
        kv,
        (runner.req_to_token.available_size(), rows0),
        prebuilt,
        local_states,
        dict(failures),
    )


def side_config(model: Path, tp: int, dp: int, mode: str, port: int, **kw: Any) -> EngineConfig:
    options: dict[str, Any] = dict(
        backend="thread",
        disaggregation_mode=mode,
        disaggregation_bootstrap_port=port,
        kv_pool_tokens=POOL,
        max_running_requests=8,
        chunked_prefill_size=8,
        disaggregation_heartbeat_s=0.2,
    )
    return EngineConfig.from_options(str(model), tp, dp, **{**options, **kw})


def run_pd(
    model: Path,
    prefill: tuple[int, int],
    decode: tuple[int, int],
    specs: tuple[Spec, ...],
    prefill_kw: dict[str, Any] | None = None,
    decode_kw: dict[str, Any] | None = None,
    start_prefill: bool = True,
    wrap_decode: Wrap | None = None,
) -> tuple[list[SideRun], list[SideRun]]:
    """Both worlds at once; returns (prefill runs, decode runs) in rank order."""
    server = BootstrapServer(0, prefill[0], host="127.0.0.1")
    port = server.port
    try:
        groups = []
        sides = [("decode", decode, decode_kw)]
        if start_prefill:
            sides.insert(0, ("prefill", prefill, prefill_kw))
        for side, (tp, dp), kw in sides:
            cfg = side_config(model, tp, dp, side, port, **(kw or {}))

            wrap = wrap_decode if side == "decode" else None

            def fn(
                ps: ParallelState, cfg: EngineConfig = cfg, side: str = side, wrap: Any = wrap
            ) -> SideRun:
                return drive_side(ps, cfg, specs, port, side, wrap)

            groups.append(RankGroup(fn, Layout(tp, dp), "thread", timeout_s=60))
        results = [g.wait() for g in groups]
    finally:
        server.close()
    if not start_prefill:
        return [], results[0]
    return results[0], results[1]


def run_colocated(model: Path, specs: tuple[Spec, ...]) -> dict[str, Result]:
    cfg = side_config(model, 1, 1, "null", 0)

    def fn(ps: ParallelState) -> SideRun:
        return drive_side(ps, cfg, specs, None, "null")

    [run] = RankGroup(fn, Layout(1, 1), "thread", timeout_s=60).wait()
    return run.outputs


def merged(runs: list[SideRun]) -> dict[str, Result]:
    out: dict[str, Result] = {}
    for r in runs:
        out.update(r.outputs)
    return out


def check_groups(runs: list[SideRun], layout: Layout) -> None:
    """Ranks of one group: identical queues after every step, identical outputs; no leaks."""
    for r in runs:
        lead = runs[r.dp_rank * layout.attn_tp_size]
        assert r.queues == lead.queues, f"rank {r.rank}: queues differ from its group leader's"
        assert r.outputs == lead.outputs, f"rank {r.rank}: outputs differ from its leader's"
        assert r.kv[0] == r.kv[1], f"rank {r.rank}: KV slots leaked ({r.kv})"
        assert r.rows[0] == r.rows[1], f"rank {r.rank}: request rows leaked ({r.rows})"
