"""The event loop of one rank: receive (leader) and broadcast requests, step the scheduler."""

from __future__ import annotations

import dataclasses
import functools
import os
import resource
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import zmq

from dpattn.config import EngineConfig
from dpattn.disaggregation.factory import build_scheduler
from dpattn.distributed.parallel_state import ParallelState
from dpattn.distributed.shm_group import ShmTorchGroup
from dpattn.executor.model_runner import ModelRunner
from dpattn.layers.quant import weight_bytes
from dpattn.logs import RankLogger, configure_logging, rank_logger
from dpattn.messages import (
    AbortReq,
    BatchOutput,
    FlushCache,
    GenerateBatch,
    RankInput,
    RankReady,
    Shutdown,
    TokenizedGenerateReq,
)
from dpattn.runtime.host_memory import rank_memory_policy, resident_bytes
from dpattn.scheduler.mlp_sync import SyncRow
from dpattn.scheduler.pipeline import PipelineStage
from dpattn.scheduler.schedule_batch import Req
from dpattn.scheduler.scheduler import Scheduler
from dpattn.scheduler.step_log import StepLog

IDLE_BACKOFF_MAX_MS = 50


@dataclass
class WorkerAddrs:
    requests: list[str]  # one per DP group: where its leader pulls requests from
    outputs: str  # where leaders push outputs to


def eos_token_ids(model_path: str, hf_config: Any) -> set[int]:
    ids: set[int] = set()
    try:
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:
        eos = None
    for value in (eos, getattr(hf_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(value)
    return ids


def load_tokenizer(model_path: str) -> Any:
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError):
        return None


def name_rank(ps: ParallelState, cfg: EngineConfig) -> RankLogger:
    """Process title `dpattn::scheduler_DP0_TP1` (`_PP1_DP0_TP1` with pipeline stages) and this
    rank's `[DP d TP t]` (`[PP s DP d TP t]`) logger."""
    stage = ps.pp_rank if ps.pp_size > 1 else None
    if cfg.backend != "thread":  # a spawned process: its own logging; threads share the caller's
        configure_logging(cfg.log_level)
        try:
            from setproctitle import setproctitle

            pp = f"PP{stage}_" if stage is not None else ""
            setproctitle(f"dpattn::scheduler_{pp}DP{ps.dp_rank}_TP{ps.rank}")
        except ImportError:  # optional: an unnamed process works the same
            pass
    return rank_logger(__name__, ps.dp_rank, ps.rank, stage)


def scheduler_main(ps: ParallelState, cfg: EngineConfig, addrs: WorkerAddrs) -> dict[str, Any]:
    log = name_rank(ps, cfg)
    if cfg.scheduler.debug_lockstep:
        ps.set_lockstep(True)
    parent = os.getppid()
    with rank_memory_policy(cfg.device == "cpu" and cfg.backend != "thread"):
        runner = ModelRunner(cfg.runner, ps)
    sched = build_scheduler(  # disaggregation: a prefill or decode server's scheduler
        cfg,
        runner,
        eos_token_ids(cfg.model_path, runner.hf_config),
        functools.cache(functools.partial(load_tokenizer, cfg.model_path)),
    )
    # Stage 0's attn_tp leaders talk to the frontend; later stages get their inputs from the
    # previous stage (scheduler/pipeline.py) and their outputs reach the frontend via stage 0.
    leader = ps.attn_tp_rank == 0 and ps.is_first_stage
    stage = PipelineStage(sched, ps.pp) if ps.pp is not None else None
    ctx = zmq.Context()
    pull = push = None
    if leader:
        pull = ctx.socket(zmq.PULL)
        pull.connect(addrs.requests[ps.dp_rank])
        push = ctx.socket(zmq.PUSH)
        push.connect(addrs.outputs)
        push.send_pyobj(
            RankReady(
                ps.dp_rank,
                runner.kv_pool.available_size(),
                runner.context_length,
                runner.vocab_size,
                runner.kv_budget.source,
                runner.kv_budget.bytes_per_token,
                weight_bytes(runner.model),
                resident_bytes(),
            )
        )
    step_log = StepLog(runner.kv_pool.size, cfg.log_interval) if leader else None
    log.debug("ready: %d KV slots", runner.kv_pool.size)
    collectives: dict[str, dict[str, int]] = {}
    backoff_ms, shutdown, flushed, steps = 0, False, False, 0
    reported_kv_free = runner.kv_pool.available_size()  # as RankReady told the frontend
    try:
        while True:
            msgs: list[RankInput] = []
            if pull is not None and pull.poll(0 if sched.has_work else backoff_ms):
                while pull.poll(0):
                    msg = pull.recv_pyobj()
                    msgs.extend(msg.reqs if isinstance(msg, GenerateBatch) else [msg])
            if ps.attn_tp_size > 1 and ps.is_first_stage:
                msgs = ps.attn_tp_cpu.broadcast_object(msgs)
            if stage is not None:
                msgs = stage.exchange(msgs)
            stop, flush = take_inputs(sched, msgs)
            shutdown, flushed = shutdown or stop, flushed or flush
            if cfg.fault is not None:
                cfg.fault.before_step(ps, steps)
            if os.getppid() != parent:  # the engine died without shutting us down
                raise RuntimeError(f"rank {ps.global_rank}: engine process {parent} is gone")
            decision = stage.step(shutdown) if stage is not None else sched.step(shutdown)
            calls = ps.trace.take()  # emptied every step: a serving loop must not let it grow
            stats = sched.last_stats
            kv_free = sched.cache.available_size()
            if step_log is not None and (line := step_log.update(stats, kv_free, _now())):
                log.info(line)
            key = f"{stats.forward_mode}/{stats.padding_mode}"
            if stats.forward_mode != "none" and key not in collectives:
                # what one forward of this kind issues (fixed per kind): counted once, not per step
                collectives[key] = dict(Counter(f"{g}.{op}" for g, op, _ in calls))
            steps += 1
            outputs = sched.take_outputs()
            # A step without a forward may still free KV (a pipelined prefill server releases
            # a sent request's slots in a later micro-batch): the frontend hears of it too.
            moved = kv_free != reported_kv_free
            if push is not None and (outputs or decision.run_forward or flushed or moved):
                cached = sched.cache.cached_size()
                push.send_pyobj(BatchOutput(ps.dp_rank, outputs, stats, kv_free, flushed, cached))
                reported_kv_free = kv_free
            flushed = False
            if decision.shutdown:
                break
            idle = not decision.run_forward and not sched.has_work
            cap = min(IDLE_BACKOFF_MAX_MS, sched.max_idle_backoff_ms)
            backoff_ms = min(max(1, 2 * backoff_ms), cap) if idle else 0
    finally:
        sched.close()
        for sock in (pull, push):
            if sock is not None:
                sock.close(linger=1000)
        ctx.term()
    return {
        "pp_rank": ps.pp_rank,
        "pipeline": None if stage is None else dataclasses.asdict(stage.counters),
        "steps": steps,
        "num_layers": len(runner.model.layers),
        "collectives_per_forward": collectives,  # per step, MLP sync included
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "kv_free": sched.cache.available_size(),
        "kv_cached": sched.cache.flush(),  # and the pool whole again: what leaked shows below
        "kv_free_after_flush": runner.kv_pool.available_size(),
        "kv_total": runner.kv_pool.size,
        "bare_all_gather_s": bare_all_gather_seconds(ps, ps.world_cpu.all_gather),
        # the same row through gloo, where the sync uses shared memory
        "bare_gloo_all_gather_s": (
            bare_all_gather_seconds(ps, ps.world_cpu.pg_all_gather)
            if isinstance(ps.world_cpu, ShmTorchGroup)
            else None
        ),
    }


def take_inputs(sched: Scheduler, msgs: list[RankInput]) -> tuple[bool, bool]:
    """Hand the frontend's messages to the scheduler: (a Shutdown came, a FlushCache ran).
    Wake only ends the idle back-off."""
    shutdown = flushed = False
    for msg in msgs:
        if isinstance(msg, TokenizedGenerateReq):
            sched.add_request(Req.from_message(msg))
        elif isinstance(msg, AbortReq):
            sched.abort_request(msg.rid)
        elif isinstance(msg, Shutdown):
            shutdown = True
        elif isinstance(msg, FlushCache):
            sched.flush_cache()
            flushed = True
    return shutdown, flushed


def bare_all_gather_seconds(
    ps: ParallelState, all_gather: Callable[[torch.Tensor], torch.Tensor], iters: int = 100
) -> float:
    """Mean time of a bare world all-gather of the MLP sync's row: the floor for the sync cost.

    Every rank calls this right after leaving the loop in the same iteration, so it stays in
    lock-step; at D == 1 the sync issues no collective and the floor is 0.
    """
    if ps.dp_size == 1:
        return 0.0
    row = torch.tensor([SyncRow().as_list()], dtype=torch.int64)
    all_gather(row)  # warm-up
    t0 = time.perf_counter()
    for _ in range(iters):
        all_gather(row)
    return (time.perf_counter() - t0) / iters


def _now() -> float:
    return time.perf_counter()
