"""DP attention against TP attention on one checkpoint, side by side in one run (issue 24).

Both layouts use the same world size T and the same KV memory per rank (bytes): DP attention
(`--tp T --dp T`, A = 1) and TP attention (`--tp T --dp 1`, A = T). Each layout's pool gets
bytes // (its KV bytes per token per rank) slots, the bytes per token as its ranks report them
(`Engine.kv_bytes_per_token`), so the comparison stays right for any attention:

- GQA: under TP attention a rank holds num_kv_heads / A heads of every request, so its bytes
  per token shrink with A and the system holds as many tokens as under DP attention;
- MLA: one latent row per token, replicated inside attn_tp, so its bytes per token do not
  shrink with A: at the same memory per rank DP attention holds D times the tokens.

The workload is many requests with long distinct prompts (first tokens all different where the
vocabulary allows, and the warm-up's cache flushed: the prefix cache shares nothing), all
submitted at once, whose KV does not fit the pools at once: the figures are the most concurrent
tokens the system held, output throughput, TTFT and retractions.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from dpattn.entrypoints.engine import Delta, Engine
from dpattn.executor.sampling_params import SamplingParams
from dpattn.tools.bench import percentiles

# (tp_size, dp_size, **config options) -> a started Engine
EngineFactory = Callable[..., Engine]

DEFAULT_DP_TOKENS = 1024  # DP layout's slots per rank when no KV size is given
PROBE_TOKENS = 16  # a layout's bytes per token is asked from an engine with a pool this small


@dataclass
class DpAttentionBenchConfig:
    tp: int = 4
    num_prompts: int = 64
    input_len: int = 192
    output_len: int = 32
    # The KV memory per rank, one of: the DP layout's slots per rank (x its bytes per token),
    # bytes, or each pool sized from memory by the engine (mem_fraction_static, equal bytes).
    max_total_tokens: int | None = None
    kv_bytes_per_rank: int | None = None
    mem_fraction_static: float | None = None
    seed: int = 0


def layouts(tp: int) -> list[tuple[str, int, int]]:
    return [("dp_attention", tp, tp), ("tp_attention", tp, 1)]


def _probe_bytes_per_token(
    make_engine: EngineFactory, tp: int, dp: int, probe_options: dict[str, Any]
) -> int:
    """What one token's KV costs a rank of this layout, as its ranks report it (an engine with
    a small pool; `probe_options` may start it cheaper, e.g. on threads: the figure depends on
    the layout, the model and the dtype only)."""
    with make_engine(tp, dp, **{**probe_options, "kv_pool_tokens": PROBE_TOKENS}) as engine:
        return engine.kv_bytes_per_token


def _prompts(cfg: DpAttentionBenchConfig, vocab: int) -> list[list[int]]:
    """Distinct prompts: different first tokens (when the vocabulary has enough), so no two
    share a prefix in the radix cache; the rest random."""
    rng = random.Random(cfg.seed)
    ids = range(3, vocab)
    n = cfg.num_prompts
    first = rng.sample(ids, n) if n <= len(ids) else [rng.choice(ids) for _ in range(n)]
    return [[f] + [rng.choice(ids) for _ in range(cfg.input_len - 1)] for f in first]


def _warm_up(engine: Engine, vocab: int, seed: int) -> None:
    """One short request per DP group (first-call costs), then the prefix cache flushed."""
    rng = random.Random(seed + 1)
    dp = engine.layout.dp_size
    warm = [[rng.randrange(3, vocab) for _ in range(8)] for _ in range(dp)]
    params = {"max_new_tokens": 2, "temperature": 0.0, "ignore_eos": True}
    engine.generate(input_ids=warm, sampling_params=params, dp_rank=list(range(dp)))
    engine.flush_cache()


def run_workload(engine: Engine, prompts: list[list[int]], output_len: int) -> dict[str, Any]:
    """Submit every prompt at once; the layout's capacity, peak use, throughput, TTFT."""
    first: dict[str, float] = {}
    finished: dict[str, float] = {}

    def on_delta(delta: Delta) -> None:  # the engine's reader thread
        now = time.perf_counter()
        if delta.new_ids:
            first.setdefault(delta.rid, now)
        if delta.finish_reason is not None:
            finished[delta.rid] = now

    params = SamplingParams(max_new_tokens=output_len, temperature=0.0, ignore_eos=True)
    retractions_before = sum(engine.retractions)
    steps_before = len(engine.step_stats)
    engine.reset_kv_peak()
    start = time.perf_counter()
    rids = []
    for p in prompts:
        rid = engine.submit(p, params)
        engine.listen(rid, on_delta)
        rids.append(rid)
    results = [engine.result(rid) for rid in rids]
    elapsed = time.perf_counter() - start
    running: dict[int, int] = {}
    peak_running = 0
    for d, stats in list(engine.step_stats)[steps_before:]:
        running[d] = stats.running
        peak_running = max(peak_running, sum(running.values()))
    out_lens = [len(r["output_ids"]) for r in results]
    reasons = [r["meta_info"]["finish_reason"] for r in results]
    dp, tp = engine.layout.dp_size, engine.layout.tp_size
    per_rank = engine.kv_total[0]
    return {
        "layout": {"tp": tp, "dp": dp, "attn_tp": tp // dp},
        "kv_bytes_per_token_per_rank": engine.kv_bytes_per_token,
        "kv_bytes_per_rank": engine.kv_bytes_per_token * per_rank,
        "kv_tokens_per_rank": per_rank,
        "kv_tokens_system": engine.kv_capacity_tokens,
        "kv_source": engine.kv_source,
        "context_length": engine.context_length,
        "peak_kv_tokens_system": engine.kv_used_peak,
        "peak_running_requests": peak_running,
        "retractions": sum(engine.retractions) - retractions_before,
        "completed": sum(1 for f, n in zip(reasons, out_lens) if f == "length" and n == output_len),
        "output_lens": sorted(set(out_lens)),
        "cached_prompt_tokens": sum(r["meta_info"]["cached_tokens"] for r in results),
        "elapsed_s": elapsed,
        "output_tokens_per_s": sum(out_lens) / elapsed,
        "total_tokens_per_s": (sum(out_lens) + sum(len(p) for p in prompts)) / elapsed,
        "ttft_s": percentiles([first[r] - start for r in rids if r in first]),
        "latency_s": percentiles([finished[r] - start for r in rids if r in finished]),
    }


def compare_dp_attention(
    make_engine: EngineFactory,
    cfg: DpAttentionBenchConfig,
    probe_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the workload on both layouts, each pool sized to the same KV bytes per rank."""
    bytes_per_rank = cfg.kv_bytes_per_rank
    by_memory = bytes_per_rank is None and cfg.mem_fraction_static is not None
    dp_tokens = cfg.max_total_tokens or DEFAULT_DP_TOKENS
    if bytes_per_rank is not None and bytes_per_rank <= 0:
        raise ValueError(f"kv_bytes_per_rank must be positive (got {bytes_per_rank})")
    rows: dict[str, dict[str, Any]] = {}
    prompts: list[list[int]] = []
    for name, tp, dp in layouts(cfg.tp):
        if by_memory:  # each engine takes the same fraction of the same memory
            options: dict[str, Any] = {"mem_fraction_static": cfg.mem_fraction_static}
        elif bytes_per_rank is None:  # the first (DP) layout's slots set the bytes per rank
            options = {"kv_pool_tokens": dp_tokens}
        else:
            per_token = _probe_bytes_per_token(make_engine, tp, dp, probe_options or {})
            tokens = bytes_per_rank // per_token
            if tokens < 2:
                raise ValueError(
                    f"{name}: {bytes_per_rank} KV bytes per rank hold {tokens} tokens at "
                    f"{per_token} bytes per token per rank; give more"
                )
            options = {"kv_pool_tokens": tokens}
        with make_engine(tp, dp, **options) as engine:
            if bytes_per_rank is None and not by_memory:
                bytes_per_rank = engine.kv_bytes_per_token * dp_tokens
            assert engine.limits is not None
            vocab = engine.limits.vocab_size
            if not prompts:  # the same prompts for both layouts
                prompts = _prompts(cfg, vocab)
            _warm_up(engine, vocab, cfg.seed)
            rows[name] = run_workload(engine, prompts, cfg.output_len)
            rows[name]["model"] = engine.cfg.model_path
            rows[name]["dtype"] = engine.cfg.runner.dtype
    dpa, tpa = rows["dp_attention"], rows["tp_attention"]

    def ratio(key: str, sub: str | None = None) -> float | None:
        a, b = (dpa[key], tpa[key]) if sub is None else (dpa[key].get(sub), tpa[key].get(sub))
        return a / b if a and b else None

    return {
        "benchmark": "dp_attention",
        "config": asdict(cfg),
        "kv_bytes_per_rank": bytes_per_rank,
        **rows,
        "dp_over_tp": {
            "kv_tokens_system": ratio("kv_tokens_system"),
            "peak_kv_tokens_system": ratio("peak_kv_tokens_system"),
            "output_tokens_per_s": ratio("output_tokens_per_s"),
            "ttft_mean": ratio("ttft_s", "mean"),
        },
    }


def format_table(report: dict[str, Any]) -> str:
    """The two layouts side by side, one figure a line."""
    cols = [n for n, _, _ in layouts(report["config"]["tp"])]
    rows: list[tuple[str, Any]] = [
        ("layout (tp, dp, attn_tp)", lambda r: "{tp}, {dp}, {attn_tp}".format(**r["layout"])),
        ("KV bytes / token / rank", lambda r: f"{r['kv_bytes_per_token_per_rank']:,}"),
        ("KV bytes / rank", lambda r: f"{r['kv_bytes_per_rank']:,}"),
        ("pool tokens / rank", lambda r: f"{r['kv_tokens_per_rank']:,}"),
        ("pool tokens, system", lambda r: f"{r['kv_tokens_system']:,}"),
        ("peak KV tokens held, system", lambda r: f"{r['peak_kv_tokens_system']:,}"),
        ("peak running requests", lambda r: r["peak_running_requests"]),
        ("retractions", lambda r: r["retractions"]),
        ("completed requests", lambda r: r["completed"]),
        ("output tok/s", lambda r: f"{r['output_tokens_per_s']:.1f}"),
        ("TTFT mean s", lambda r: f"{r['ttft_s']['mean']:.2f}"),
        ("TTFT p50 s", lambda r: f"{r['ttft_s']['p50']:.2f}"),
        ("TTFT p99 s", lambda r: f"{r['ttft_s']['p99']:.2f}"),
        ("elapsed s", lambda r: f"{r['elapsed_s']:.1f}"),
    ]
    table = [["", *cols], *[[label, *(str(f(report[c])) for c in cols)] for label, f in rows]]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in table
    ]
    r = report["dp_over_tp"]
    lines.append(
        f"DP / TP attention: system tokens {_x(r['kv_tokens_system'])}, peak tokens held "
        f"{_x(r['peak_kv_tokens_system'])}, output tok/s {_x(r['output_tokens_per_s'])}, "
        f"TTFT mean {_x(r['ttft_mean'])}"
    )
    return "\n".join(lines)


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"
