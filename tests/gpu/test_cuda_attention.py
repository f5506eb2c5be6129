"""Eager attention on CUDA runs no cuDNN SDPA kernel: cuDNN plans every new shape on the host
(2.6 ms a call on an H200, torch 2.11), and decode and prefill shapes change every step."""

from __future__ import annotations

from pathlib import Path

import torch

from dpattn.config import RunnerConfig, SchedulerConfig
from dpattn.distributed.parallel_state import Layout, ParallelState
from dpattn.executor.model_runner import ModelRunner
from dpattn.executor.sampling_params import SamplingParams
from dpattn.runtime.launch import run_ranks
from dpattn.scheduler.schedule_batch import Req
from dpattn.scheduler.scheduler import Scheduler


def test_eager_bf16_steps_run_no_cudnn_attention(tiny_gemma3: Path) -> None:
    def rank(ps: ParallelState) -> set[str]:
        cfg = RunnerConfig(
            str(tiny_gemma3), dtype="bfloat16", kv_pool_tokens=256, disable_cuda_graph=True
        )
        sched = Scheduler(ModelRunner(cfg, ps), SchedulerConfig(), eos_ids=set())
        params = SamplingParams(max_new_tokens=4, ignore_eos=True)
        sched.add_request(Req("a", list(range(3, 20)), params, seed=0))
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            while sched.has_work:  # a prefill and three decode steps, all eager
                sched.step()
        return {e.name for e in prof.events()}

    (names,) = run_ranks(rank, Layout(1, 1), "thread", 120, device="cuda")
    attention = {n for n in names if "attention" in n.lower()}
    assert attention, "no attention op profiled"
    assert not {n for n in attention if "cudnn" in n.lower()}, attention
