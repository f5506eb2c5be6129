"""Offline benchmark: N requests through the Engine; throughput, latency, DP-attention costs."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from tqdm import tqdm

from dpattn.entrypoints.engine import Delta, Engine
from dpattn.executor.graph_plan import graph_unavailable_reason
from dpattn.executor.model_runner import DTYPES
from dpattn.executor.sampling_params import SamplingParams
from dpattn.messages import StepStats


@dataclass
class BenchConfig:
    num_prompts: int = 64
    input_len: int = 32
    output_len: int = 16
    range_ratio: float = 1.0  # lengths drawn uniformly from [ratio * len, len]
    seed: int = 0
    progress: bool = True


def _lengths(rng: random.Random, n: int, length: int, ratio: float) -> list[int]:
    lo = max(1, int(length * ratio))
    return [rng.randint(lo, length) for _ in range(n)]


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    qs = (
        statistics.quantiles(values, n=100, method="inclusive")
        if len(values) > 1
        else [values[0]] * 99
    )
    return {
        "mean": statistics.fmean(values),
        "p50": qs[49],
        "p90": qs[89],
        "p99": qs[98],
        "max": max(values),
    }


@dataclass
class Workload:
    """The bench's requests: random prompts of random lengths, greedy, ignore_eos."""

    in_lens: list[int]
    out_lens: list[int]
    prompts: list[list[int]]


def draw_workload(engine: Engine, cfg: BenchConfig) -> Workload:
    rng = random.Random(cfg.seed)
    vocab = int(getattr(engine.tokenizer, "vocab_size", 0) or 256)
    in_lens = _lengths(rng, cfg.num_prompts, cfg.input_len, cfg.range_ratio)
    out_lens = _lengths(rng, cfg.num_prompts, cfg.output_len, cfg.range_ratio)
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in in_lens]
    return Workload(in_lens, out_lens, prompts)


@dataclass
class TimedRun:
    """One batch of requests sent at once, timed from the first submit to the last result."""

    start: float
    elapsed: float
    rids: list[str]
    first_token: dict[str, float]
    finished: dict[str, float]
    output_tokens: int  # as generated (the workload's out_lens unless a request stopped early)
    steps: list[tuple[int, StepStats]]  # (DP group, stats) of the steps taken meanwhile


def timed_run(
    engine: Engine, prompts: list[list[int]], params: list[SamplingParams], progress: bool
) -> TimedRun:
    first_token: dict[str, float] = {}
    finished: dict[str, float] = {}
    bar = tqdm(total=len(prompts), desc="requests", disable=None if progress else True, leave=False)

    def on_delta(delta: Delta) -> None:
        now = time.perf_counter()
        if delta.new_ids:
            first_token.setdefault(delta.rid, now)
        if delta.finish_reason is not None:
            finished[delta.rid] = now
            bar.update(1)

    steps_before = len(engine.step_stats)
    start = time.perf_counter()
    rids = []
    for ids, p in zip(prompts, params):
        rid = engine.submit(ids, p)
        engine.listen(rid, on_delta)
        rids.append(rid)
    tokens = sum(len(engine.result(rid)["output_ids"]) for rid in rids)  # raises if a rank died
    elapsed = time.perf_counter() - start
    bar.close()
    steps = list(engine.step_stats)[steps_before:]
    return TimedRun(start, elapsed, rids, first_token, finished, tokens, steps)


def run_offline(engine: Engine, cfg: BenchConfig) -> dict[str, Any]:
    """Benchmark a running engine, then shut it down (which measures the bare all-gather)."""
    work = draw_workload(engine, cfg)
    run = timed_run(engine, work.prompts, [bench_params(n) for n in work.out_lens], cfg.progress)
    engine.shutdown()
    return offline_report(engine, cfg, work, run)


def offline_report(
    engine: Engine, cfg: BenchConfig, work: Workload, run: TimedRun
) -> dict[str, Any]:
    """run_offline's report, from a run on an engine that was shut down since."""
    steps, start, rids, elapsed = run.steps, run.start, run.rids, run.elapsed
    in_lens, out_lens = work.in_lens, work.out_lens
    forward = [s for _, s in steps if s.forward_mode != "none"]
    # Every leader reports the global buffer B; DP group 0's leader sees every forward step.
    lead = [s for d, s in steps if d == 0 and s.forward_mode != "none"]
    real = sum(sum(s.global_num_tokens) for s in lead)
    padded = sum(s.padded_tokens for s in lead)
    sync = [s.sync_s for _, s in steps]
    bare = [r["bare_all_gather_s"] for r in engine.rank_results]
    bare_gloo = [r["bare_gloo_all_gather_s"] for r in engine.rank_results]
    rank0 = engine.rank_results[0] if engine.rank_results else {}
    out_tokens = sum(out_lens)
    report = {
        "config": asdict(cfg),
        "model": engine.cfg.model_path,
        "dtype": engine.cfg.runner.dtype,
        "layout": {
            "tp": engine.layout.tp_size,
            "dp": engine.layout.dp_size,
            "pp": engine.layout.pp_size,
        },
        "elapsed_s": elapsed,
        "requests_per_s": cfg.num_prompts / elapsed,
        "output_tokens_per_s": out_tokens / elapsed,
        "total_tokens_per_s": (out_tokens + sum(in_lens)) / elapsed,
        "latency_s": percentiles([run.finished[r] - start for r in rids]),
        "ttft_s": percentiles([run.first_token[r] - start for r in rids if r in run.first_token]),
        "forward_steps": {
            m: sum(1 for s in forward if s.forward_mode == m) for m in ("extend", "decode", "idle")
        },
        "idle_batches": sum(1 for s in forward if s.idle_batch),
        # rows the MLP ran on per real token (>= 1): attn_tp padding plus MAX_LEN slots
        "padding_waste": padded / real if real else None,
        "mlp_sync_s_per_step": statistics.fmean(sync) if sync else 0.0,
        # the sync split: waiting for the slowest rank (load skew), then the collective itself
        "mlp_sync_wait_s_per_step": _mean([s.sync_wait_s for _, s in steps]),
        "mlp_sync_collective_s_per_step": _mean([s.sync_collective_s for _, s in steps]),
        "bare_all_gather_s": statistics.fmean(bare) if bare else 0.0,
        # shared-memory sync (one host): the same row over gloo, the floor it replaced
        "bare_gloo_all_gather_s": (
            statistics.fmean(bare_gloo) if bare_gloo and None not in bare_gloo else None
        ),
        "decode_step_over_forward": _step_over_forward(engine, (s for _, s in steps)),
        "rank_max_rss_mb": [r.get("max_rss_mb") for r in engine.rank_results],
        "num_layers": _num_layers(engine),
        "collectives_per_forward": rank0.get("collectives_per_forward"),
        "pipeline": pipeline_report(engine),
    }
    for floor in ("bare_all_gather", "bare_gloo_all_gather"):
        for key in ("mlp_sync", "mlp_sync_collective"):
            value = report[f"{floor}_s"]
            report[f"{key}_over_{floor}"] = report[f"{key}_s_per_step"] / value if value else None
    return report


def pipeline_report(engine: Engine) -> dict[str, Any] | None:
    """--pp-size > 1: each stage's busy fraction (forward time over the wall time of the
    micro-batches it ran: 1 - its bubble) and the output messages the pipeline sent around the
    ring vs skipped (micro-batches that produced nothing, e.g. a long prompt's middle chunks).
    From the ranks' counters at shutdown; None without stages or with stages on other hosts."""
    layout, results = engine.layout, engine.rank_results
    if layout.pp_size == 1 or len(results) < layout.world_size:
        return None
    stages = []
    for s in range(layout.pp_size):
        counters = [results[g]["pipeline"] for g in layout.stage_ranks(s)]
        busy = statistics.fmean(c["busy_s"] for c in counters)
        active = statistics.fmean(c["active_s"] for c in counters)
        stages.append(
            {"busy_s": busy, "active_s": active, "busy_fraction": busy / active if active else None}
        )
    # Every stage of a lane counts the same micro-batches; each DP group has its own: summed
    # over stage 0's DP group leaders.
    leaders = [results[layout.attn_tp_ranks(d)[0]]["pipeline"] for d in range(layout.dp_size)]
    return {
        "stages": stages,
        "output_messages_sent": sum(c["outputs_sent"] for c in leaders),
        "output_messages_skipped": sum(c["outputs_skipped"] for c in leaders),
    }


def _num_layers(engine: Engine) -> int | None:
    """The model's decoder layers: the sum over the pipeline stages' first ranks (each holds
    its stage's layers; at --pp-size 1 rank 0 holds them all)."""
    results, layout = engine.rank_results, engine.layout
    leads = [results[g] for g in range(0, len(results), layout.tp_size)]
    if len(leads) < layout.pp_size:  # a stage on another host (multi-node): not known here
        return None
    counts = [r.get("num_layers") for r in leads]
    return None if None in counts else sum(counts)


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else 0.0


def _step_over_forward(engine: Engine, stats: Iterable[StepStats]) -> float | None:
    """Engine overhead: a whole decode iteration over its bare model forward (>= 1). None on a
    GPU: the step does not synchronise the device after the forward (only when the token ids
    come back), so forward_s there is the host's launch time, not the forward's."""
    if (engine.cfg.device or "cpu") != "cpu":
        return None
    decode = [s for s in stats if s.forward_mode == "decode" and s.forward_s > 0]
    if not decode:
        return None
    return sum(s.step_s for s in decode) / sum(s.forward_s for s in decode)


def _hf_generate(hf: Any, prompts: list[list[int]], new_tokens: int, device: str) -> None:
    import torch

    hf.generate(
        torch.tensor(prompts, device=device),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    if device == "cuda":
        torch.cuda.synchronize()


def _prompts(rng: random.Random, n: int, length: int, vocab: int) -> list[list[int]]:
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]


def _graphs_on(engine: Engine) -> bool:
    """Whether the engine's ranks replay decode CUDA graphs (the runner's own rule)."""
    cfg = engine.cfg
    return (
        graph_unavailable_reason(
            cfg.device or "cpu",
            cfg.backend == "nccl",
            cfg.runner.disable_cuda_graph,
            cfg.tp_size,
            cfg.runner.dp_padding_mode,
        )
        is None
    )


def bench_params(max_new_tokens: int, json_schema: str | None = None) -> SamplingParams:
    """A bench request: greedy, exactly max_new_tokens new tokens (unless its grammar ends)."""
    return SamplingParams(
        max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True, json_schema=json_schema
    )


def compare_with_transformers(
    engine: Engine,
    batch_sizes: tuple[int, ...] = (1, 16, 64),
    new_tokens: int = 32,
    prompt_len: int = 8,
    seed: int = 0,
    repeats: int = 3,
) -> list[dict[str, Any]]:
    """Greedy generation throughput at fixed batch sizes: this engine vs transformers' generate
    on the same prompts, measured side by side in one run (prompts of equal length: no padding).

    Both are warmed up first at each batch size, on other prompts of the same shape (so the
    prefix cache holds nothing of the timed ones): first-call costs (allocations, kernel
    selection) are not part of either figure. Each side then runs `repeats` times, alternating,
    on fresh prompts each round (the same for both); the figures are the medians, so one noisy
    run on a shared machine does not decide the ratio."""
    import torch
    from transformers import AutoModelForCausalLM

    model_path = engine.cfg.model_path
    dtype = DTYPES[engine.cfg.runner.dtype]
    device = engine.cfg.device or "cpu"  # transformers runs where the engine's ranks run
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    rng = random.Random(seed)
    vocab = int(hf.config.get_text_config().vocab_size)
    rows = []
    for b in batch_sizes:  # the same prompts for both engines (one rng, drawn in this order)
        warm = _prompts(rng, b, prompt_len, vocab)
        params = {"max_new_tokens": new_tokens, "temperature": 0, "ignore_eos": True}
        engine.generate(input_ids=warm, sampling_params={**params, "max_new_tokens": 4})
        with torch.inference_mode():
            _hf_generate(hf, warm, 4, device)
        ours_s, theirs_s, stats = [], [], []
        for _ in range(repeats):
            prompts = _prompts(rng, b, prompt_len, vocab)
            before = len(engine.step_stats)
            t0 = time.perf_counter()
            engine.generate(input_ids=prompts, sampling_params=params)
            ours_s.append(time.perf_counter() - t0)
            stats += list(engine.step_stats)[before:]
            with torch.inference_mode():
                t0 = time.perf_counter()
                _hf_generate(hf, prompts, new_tokens, device)
                theirs_s.append(time.perf_counter() - t0)
        ours, theirs = statistics.median(ours_s), statistics.median(theirs_s)
        tokens = b * new_tokens
        rows.append(
            {
                "dtype": engine.cfg.runner.dtype,
                "device": device,
                "cuda_graph": _graphs_on(engine),
                "batch": b,
                "new_tokens": new_tokens,
                "dpattn_tokens_per_s": tokens / ours,
                "transformers_tokens_per_s": tokens / theirs,
                "dpattn_over_transformers": theirs / ours,
                "repeats": repeats,
                "dpattn_over_transformers_each": [t / o for o, t in zip(ours_s, theirs_s)],
                "decode_step_over_forward": _step_over_forward(engine, (s for _, s in stats)),
            }
        )
    return rows
