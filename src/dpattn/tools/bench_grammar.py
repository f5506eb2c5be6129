"""`dpattn bench --constrained-share S [S ...]`: what constrained decoding costs.

A share S of the bench's requests generates under a JSON schema (bench_schema), the rest as
usual. The shares run side by side in one run on one engine: the same prompts and lengths for
each, the prefix cache flushed before each run (no share finds another's prompts cached), every
share run once untimed first (the grammar compiles, the shapes warm up), then `repeats` rounds
in alternating order (0 0.5 1, then 1 0.5 0, ...) whose medians are reported, so that neither
drift nor order favours a share on a shared machine.

Per share: output tokens/s and requests/s; the mean step time; the grammar masks' cost
(StepStats.grammar_s: waiting for the fill thread, then applying the bitmask to the logits) per
step and per constrained row; and the share of step time the masks took.
"""

from __future__ import annotations

import json
import random
import statistics
from dataclasses import asdict
from typing import Any

from dpattn.entrypoints.engine import Engine
from dpattn.executor.sampling_params import SamplingParams
from dpattn.tools.bench import (
    BenchConfig,
    TimedRun,
    Workload,
    bench_params,
    draw_workload,
    timed_run,
)

ITEM_CHARS = 8


def bench_schema(output_len: int) -> str:
    """A realistic schema that does not end before output_len tokens: an array of at least
    output_len short strings, each item at least `"", ` (no token spans several whole items).
    Constrained requests so produce exactly output_len tokens, as the others do (ignore_eos),
    and every share does the same work (each share's output_tokens shows it)."""
    items = {"type": "string", "maxLength": ITEM_CHARS}
    return json.dumps({"type": "array", "items": items, "minItems": max(1, output_len)})


def constrained_mask(n: int, share: float, seed: int) -> list[bool]:
    """Which of n requests carry the grammar: round(share * n) of them, picked at random
    (seeded). An even stride would not do: round-robin DP routing could put them all in one
    DP group."""
    picked = set(random.Random(seed).sample(range(n), round(share * n)))
    return [i in picked for i in range(n)]


def share_params(work: Workload, mask: list[bool], schema: str) -> list[SamplingParams]:
    return [bench_params(n, schema if c else None) for n, c in zip(work.out_lens, mask)]


def warm_up(
    engine: Engine, cfg: BenchConfig, work: Workload, schema: str, masks: list[list[bool]]
) -> None:
    """Compile the grammar on every rank (a large vocabulary's tokenizer info alone takes ~1 s)
    and run each share once on other prompts of the same lengths: the first run of a shape
    pays for its kernels, and the first all-constrained run was seen to take twice as long as
    the later ones (Gemma 3 at (1,1): 479 against 265 ms per step)."""
    rng = random.Random(cfg.seed + 1)
    vocab = int(getattr(engine.tokenizer, "vocab_size", 0) or 256)
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in work.in_lens]
    for mask in masks:
        timed_run(engine, prompts, share_params(work, mask, schema), progress=False)


def run_figures(run: TimedRun) -> dict[str, Any]:
    """One timed run's figures; steps are every DP group leader's forward steps."""
    forward = [s for _, s in run.steps if s.forward_mode != "none"]
    step_s = sum(s.step_s for s in forward)
    forward_s = sum(s.forward_s for s in forward)
    grammar_s = sum(s.grammar_s for s in forward)
    rows = sum(s.constrained for s in forward)
    n = max(1, len(forward))
    return {
        "elapsed_s": run.elapsed,
        "output_tokens": run.output_tokens,
        "output_tokens_per_s": run.output_tokens / run.elapsed,
        "requests_per_s": len(run.rids) / run.elapsed,
        "forward_steps": len(forward),
        "step_s_mean": step_s / n,
        # the model forward alone: on a few cores the mask-filling thread can slow it down
        "forward_s_mean": forward_s / n,
        "grammar_s_per_step": grammar_s / n,
        "grammar_s_per_constrained_row": grammar_s / rows if rows else None,
        "grammar_share_of_step_time": grammar_s / step_s if step_s else 0.0,
        "constrained_rows": rows,  # tokens sampled under the grammar
    }


def _median(runs: list[dict[str, Any]], key: str) -> Any:
    values = [r[key] for r in runs]
    if None in values:
        return None
    # counts stay counts (a median of two would average them)
    return (
        statistics.median_low(values) if isinstance(values[0], int) else statistics.median(values)
    )


def share_row(share: float, constrained: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A share's figures over its rounds: medians, with each round's throughput listed."""
    row: dict[str, Any] = {"share": share, "constrained_requests": constrained}
    row |= {key: _median(runs, key) for key in runs[0]}
    row["output_tokens_per_s_each"] = [r["output_tokens_per_s"] for r in runs]
    return row


def compare_shares(
    engine: Engine, cfg: BenchConfig, shares: list[float], repeats: int = 1
) -> dict[str, Any]:
    """The shares side by side on a running engine (the caller shuts it down)."""
    schema = bench_schema(cfg.output_len)
    work = draw_workload(engine, cfg)
    masks = {s: constrained_mask(cfg.num_prompts, s, cfg.seed) for s in shares}
    warm_up(engine, cfg, work, schema, list(masks.values()))
    runs: dict[float, list[dict[str, Any]]] = {s: [] for s in shares}
    for r in range(repeats):
        for share in shares if r % 2 == 0 else shares[::-1]:
            engine.flush_cache()
            params = share_params(work, masks[share], schema)
            runs[share].append(run_figures(timed_run(engine, work.prompts, params, cfg.progress)))
    rows = [share_row(s, sum(masks[s]), runs[s]) for s in shares]
    base = next((r for r in rows if r["share"] == 0), None)
    for row in rows:  # what the grammar costs in all: the unconstrained run is the reference
        for key in ("output_tokens_per_s", "step_s_mean"):
            row[f"{key}_vs_share_0"] = row[key] / base[key] if base else None
    return {
        "config": asdict(cfg),
        "model": engine.cfg.model_path,
        "dtype": engine.cfg.runner.dtype,
        "layout": {
            "tp": engine.layout.tp_size,
            "dp": engine.layout.dp_size,
            "pp": engine.layout.pp_size,
        },
        "schema": schema,
        "repeats": repeats,
        "shares": rows,
    }


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.2f}"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


TABLE: list[tuple[str, Any]] = [
    ("constrained requests", lambda r: str(r["constrained_requests"])),
    ("output tok/s", lambda r: f"{r['output_tokens_per_s']:.1f}"),
    ("requests/s", lambda r: f"{r['requests_per_s']:.2f}"),
    ("mean step ms", lambda r: _ms(r["step_s_mean"])),
    ("mean forward ms", lambda r: _ms(r["forward_s_mean"])),
    ("grammar ms / step", lambda r: _ms(r["grammar_s_per_step"])),
    ("grammar ms / constrained row", lambda r: _ms(r["grammar_s_per_constrained_row"])),
    ("grammar share of step time", lambda r: f"{r['grammar_share_of_step_time']:.1%}"),
    ("tok/s vs share 0", lambda r: _ratio(r["output_tokens_per_s_vs_share_0"])),
    ("step time vs share 0", lambda r: _ratio(r["step_s_mean_vs_share_0"])),
]


def format_table(report: dict[str, Any]) -> str:
    cfg, rows = report["config"], report["shares"]
    head = ["constrained share", *(f"{r['share']:g}" for r in rows)]
    lines = [head] + [[name, *(cell(r) for r in rows)] for name, cell in TABLE]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))
        )
        for line in lines
    ]
    layout = report["layout"]
    title = (
        f"constrained decoding: tp {layout['tp']} dp {layout['dp']}, {cfg['num_prompts']} "
        f"prompts of {cfg['input_len']} tokens, {cfg['output_len']} new tokens, medians of "
        f"{report['repeats']} rounds in alternating order"
    )
    return "\n".join([title, *text])
