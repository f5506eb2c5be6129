"""Drive the real scheduler as P pipeline stages of (T, D) rank threads (tests only).

Every global rank builds its stage's model runner and scheduler; stage 0's ranks take each DP
group's requests at their arrival micro-batch (as the rank loop takes them from the frontend),
every stage runs `PipelineStage.exchange` and `step`, and the driver records, per rank and
micro-batch, the scheduler's state digest and the outputs. P == 1 runs `Scheduler.step`, the
reference. A request's abort arrives at stage 0 at its abort micro-batch. The loop ends when
every request has finished on stage 0: a Shutdown rides the next control message.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from transformers import AutoConfig

from dpattn.config import RunnerConfig, SchedulerConfig
from dpattn.distributed.parallel_state import Layout, thread_parallel_state
from dpattn.distributed.thread_backend import ThreadWorld, run_threads
from dpattn.executor.model_runner import ModelRunner
from dpattn.executor.sampling_params import SamplingParams
from dpattn.messages import AbortReq, RankInput, RequestOutput, Shutdown, TokenizedGenerateReq
from dpattn.models.stage import partition_layers
from dpattn.runtime.rank_worker import take_inputs
from dpattn.scheduler.pipeline import PipelineStage, state_digest
from dpattn.scheduler.scheduler import Scheduler


@dataclass(frozen=True)
class Job:
    rid: str
    prompt: list[int]
    max_new: int = 6
    arrival: int = 0  # stage 0's micro-batch at which it arrives
    group: int = 0  # DP group
    abort_at: int | None = None
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    temperature: float = 0.0
    n: int = 1  # n > 1: n requests with one prompt (rid.i), as the frontend fans them out
    regex: str | None = None


@dataclass
class RankLog:
    outputs: list[RequestOutput] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)  # after each micro-batch's step
    counters: dict[str, Any] = field(default_factory=dict)
    sizes: list[int] = field(default_factory=list)  # requests in each micro-batch this rank ran
    retractions: int = 0


def _requests(job: Job) -> list[TokenizedGenerateReq]:
    params = SamplingParams(
        temperature=job.temperature, max_new_tokens=job.max_new, regex=job.regex
    )
    rids = [job.rid] if job.n == 1 else [f"{job.rid}.{i}" for i in range(job.n)]
    return [
        TokenizedGenerateReq(
            rid,
            job.prompt,
            params,
            seed=hash(rid) % 1000,
            return_logprob=job.return_logprob,
            logprob_start_len=job.logprob_start_len,
            top_logprobs_num=job.top_logprobs_num,
        )
        for rid in rids
    ]


def run_pipeline(
    model: str,
    jobs: list[Job],
    layout: Layout,
    kv_tokens: int = 256,
    chunk: int = 64,
    jitter_s: float = 0.0,
    seed: int = 0,
    sched_options: dict[str, Any] | None = None,
    runner_options: dict[str, Any] | None = None,
    rank_hook: Any = None,
    max_steps: int = 2000,
) -> list[RankLog]:
    """Run `jobs` to their end on P * T rank threads; one RankLog per global rank."""
    world = ThreadWorld(layout.world_size, timeout=60.0)
    want = {rid for j in jobs for r in _requests(j) for rid in [r.rid]}
    finished: set[str] = set()
    lock = threading.Lock()

    def rank(g: int) -> RankLog:
        ps = thread_parallel_state(world, layout, g)
        rcfg = RunnerConfig(model, kv_pool_tokens=kv_tokens, **(runner_options or {}))
        layers = int(AutoConfig.from_pretrained(model).num_hidden_layers)
        runner = ModelRunner(rcfg, ps, partition_layers(layers, layout.pp_size)[ps.pp_rank])
        cfg = SchedulerConfig(chunked_prefill_size=chunk, **(sched_options or {}))
        sched = Scheduler(runner, cfg, eos_ids=set())
        stage = PipelineStage(sched, ps.pp) if ps.pp is not None else None
        if rank_hook is not None:
            rank_hook(ps, sched, stage)
        rng = random.Random(seed * 1000 + g)
        log = RankLog()
        mine = [j for j in jobs if j.group == ps.dp_rank]
        for m in range(max_steps):
            msgs: list[RankInput] = []
            if ps.is_first_stage:
                for j in mine:
                    if j.arrival == m:
                        msgs += _requests(j)
                    if j.abort_at == m:
                        msgs += [AbortReq(r.rid) for r in _requests(j)]
                with lock:
                    if finished >= want:
                        msgs.append(Shutdown())
            if stage is not None:
                msgs = stage.exchange(msgs)
            shutdown, _ = take_inputs(sched, msgs)  # as the rank loop does
            if jitter_s:
                time.sleep(rng.random() * jitter_s)  # random per-stage timing
            decision = stage.step(shutdown) if stage is not None else sched.step(shutdown)
            log.digests.append(state_digest(sched))
            if stage is not None:
                ran = stage.in_flight[-1].batch if stage.in_flight else None
                log.sizes.append(len(ran.reqs) if ran is not None else 0)
            outs = sched.take_outputs()
            log.outputs += outs
            if ps.is_first_stage:
                with lock:
                    finished.update(o.rid for o in outs if o.finish_reason is not None)
            if decision.shutdown:
                break
        else:
            raise AssertionError(f"rank {g}: not done after {max_steps} micro-batches")
        log.retractions = sched.num_retractions
        if stage is not None:
            log.counters = dict(vars(stage.counters))
        sched.close()
        return log

    return run_threads(world, rank)


def tokens_by_rid(log: RankLog) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for o in log.outputs:
        out.setdefault(o.rid, []).extend(o.new_ids)
    return out


def finish_by_rid(log: RankLog) -> dict[str, str | None]:
    return {o.rid: o.finish_reason for o in log.outputs if o.finish_reason is not None}
