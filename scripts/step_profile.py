"""Where a decode step's time goes, in one rank process: the step's wall time against its forward
(on CUDA the forward's device time, from events), and a cProfile of the host side.

    python scripts/step_profile.py --arch llama --batch 64                 (tiny random model)
    python scripts/step_profile.py --model PATH --device cuda --batch 64   (graphs unless --eager)
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import json
import os
import pstats
import shutil
import statistics
import tempfile
import time
from typing import Any

import torch

from dpattn.config import RunnerConfig, SchedulerConfig
from dpattn.distributed.parallel_state import Layout, ParallelState
from dpattn.executor.model_runner import ModelRunner
from dpattn.executor.sampling_params import SamplingParams
from dpattn.models.tiny import make_tiny_model, make_tokenizer
from dpattn.runtime.host_memory import rank_memory_policy
from dpattn.runtime.launch import run_ranks
from dpattn.scheduler.schedule_batch import Req
from dpattn.scheduler.scheduler import Scheduler


def profile_rank(ps: ParallelState, args: argparse.Namespace) -> dict[str, Any]:
    steps = args.warmup + args.steps + 2 * args.profile_steps + 4
    with rank_memory_policy(ps.device.type == "cpu"):  # as the engine's CPU rank processes
        runner = ModelRunner(
            RunnerConfig(
                args.model,
                dtype=args.dtype,
                kv_pool_tokens=args.batch * (args.input_len + steps + 2),
                max_running_requests=args.batch,
                cuda_graph_max_bs=args.batch,
                disable_cuda_graph=args.eager,
                quantization=args.quantization,
                quant_batch_path=args.quant_batch_path,
            ),
            ps,
        )
    sched = Scheduler(
        runner,
        SchedulerConfig(
            chunked_prefill_size=args.batch * args.input_len, max_running_requests=args.batch
        ),
        eos_ids=set(),
    )
    cuda = ps.device.type == "cuda"
    events: list[tuple[Any, Any]] = []
    forward = runner.forward_with_logprobs

    def timed_forward(*a: Any, **kw: Any) -> Any:
        if not cuda:
            return forward(*a, **kw)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = forward(*a, **kw)
        end.record()
        events.append((start, end))
        return out

    runner.forward_with_logprobs = timed_forward  # type: ignore[method-assign]
    vocab = runner.vocab_size
    for i in range(args.batch):
        prompt = [(7 * i + 13 * j) % (vocab - 3) + 3 for j in range(args.input_len)]
        params = SamplingParams(max_new_tokens=steps, ignore_eos=True, temperature=args.temperature)
        sched.add_request(Req(f"r{i}", prompt, params, seed=i))
    for _ in range(args.warmup):
        sched.step()
    events.clear()
    rows = []
    for _ in range(args.steps):
        sched.step()
        s = sched.last_stats
        assert s.forward_mode == "decode" and s.num_tokens == args.batch, s
        rows.append((s.step_s, s.forward_s))
    if cuda:
        torch.cuda.synchronize()
    device_ms = [a.elapsed_time(b) for a, b in events]
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(args.profile_steps):
        sched.step()
    prof.disable()
    profiled_ms = (time.perf_counter() - t0) * 1e3 / max(1, args.profile_steps)
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(args.top)
    if args.torch_profile:  # per-op host and device time, same steps again
        acts = [torch.profiler.ProfilerActivity.CPU]
        acts += [torch.profiler.ProfilerActivity.CUDA] if cuda else []
        with torch.profiler.profile(activities=acts, record_shapes=args.shapes) as tp:
            for _ in range(args.profile_steps):
                sched.step()
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        for k in ("self_cpu_time_total", key)[: 1 + cuda]:
            avg = tp.key_averages(group_by_input_shape=args.shapes)
            text.write(avg.table(sort_by=k, row_limit=args.top))
    ms = 1e3
    return {
        "device": str(ps.device),
        "dtype": args.dtype,
        "batch": args.batch,
        "graphs": cuda and not args.eager,
        "step_ms": statistics.median(s for s, _ in rows) * ms,
        "forward_host_ms": statistics.median(f for _, f in rows) * ms,
        "forward_device_ms": statistics.median(device_ms) if device_ms else None,
        "profiled_step_ms": profiled_ms,
        "profile": text.getvalue(),
    }


def random_like(config_json: str, out: str) -> str:
    from transformers import AutoConfig, AutoModelForCausalLM

    shutil.copy(config_json, os.path.join(out, "config.json"))
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out))
    model.save_pretrained(out)
    make_tokenizer().save_pretrained(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", help="checkpoint dir (default: a tiny random --arch model)")
    p.add_argument("--arch", default="llama")
    p.add_argument("--like", help="a config.json: random weights of that shape (timing only)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--input-len", type=int, default=8)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--profile-steps", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--eager", action="store_true")
    p.add_argument("--quantization", help="weight format (default: the checkpoint's own)")
    p.add_argument("--quant-batch-path", default="dequantize", choices=("dequantize", "dense"))
    p.add_argument("--torch-profile", action="store_true", help="also torch.profiler's op table")
    p.add_argument("--shapes", action="store_true", help="--torch-profile: per input shape")
    p.add_argument("--save-model", help="keep the random --like model here (reuse: --model)")
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args()
    if args.model is None:
        out = args.save_model or tempfile.mkdtemp(prefix="dpattn-prof-")
        os.makedirs(out, exist_ok=True)
        args.model = str(
            random_like(args.like, out) if args.like else make_tiny_model(args.arch, out)
        )
    # A rank process, as the engine runs it: its main thread allocates from glibc's main arena,
    # where keep_freed_memory applies (a thread's arena still maps blocks over 64 MiB afresh).
    backend = "nccl" if args.device == "cuda" else "gloo"
    fn = functools.partial(profile_rank, args=args)  # picklable: ranks are processes
    (res,) = run_ranks(fn, Layout(1, 1), backend, 600, device=args.device)
    print(res.pop("profile"))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
