"""Prefix-cache benchmarks, each comparing two engines side by side in one run:

- shared prefix: N requests sharing one system prompt with short distinct questions; prefill
  throughput (prompt tokens per second until the last first token) with the radix cache and
  with --disable-radix-cache;
- multi-turn: C conversations of T turns (each turn's prompt is the whole conversation so far,
  the turns of a round arriving in random order) at dp >= 2; the prefix-cache hit rate of
  `cache_aware` DP routing against `round_robin`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from dpattn.entrypoints.engine import Delta, Engine
from dpattn.executor.sampling_params import SamplingParams

EngineFactory = Callable[..., Engine]  # options by config field name -> a started Engine


@dataclass
class PrefixBenchConfig:
    num_prompts: int = 64  # requests (shared prefix) or conversations (multi-turn)
    shared_prefix_len: int = 1024
    question_len: int = 16
    output_len: int = 1
    num_turns: int = 4
    seed: int = 0


def _vocab(engine: Engine) -> int:
    return int(getattr(engine.tokenizer, "vocab_size", 0) or 256)


def _run_batch(engine: Engine, prompts: list[list[int]], output_len: int) -> dict[str, Any]:
    """Submit every prompt at once; time until the last first token and until the last token."""
    first: dict[str, float] = {}

    def on_delta(delta: Delta) -> None:  # the engine's reader thread
        if delta.new_ids:
            first.setdefault(delta.rid, time.perf_counter())

    params = SamplingParams(max_new_tokens=output_len, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    rids = [engine.submit(p, params) for p in prompts]
    for rid in rids:
        engine.listen(rid, on_delta)
    results = [engine.result(rid) for rid in rids]
    end = time.perf_counter()
    cached = sum(r["meta_info"]["cached_tokens"] for r in results)
    prompt_tokens = sum(len(p) for p in prompts)
    return {
        "prompt_tokens": prompt_tokens,
        "cached_tokens": cached,
        "prefill_s": max(first.values()) - start,
        "elapsed_s": end - start,
        "outputs": [r["output_ids"] for r in results],
    }


def shared_prefix(make_engine: EngineFactory, cfg: PrefixBenchConfig) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    outputs = {}
    for name, disable in (("radix_cache", False), ("no_cache", True)):
        with make_engine(disable_radix_cache=disable) as engine:
            rng = random.Random(cfg.seed)  # the same prompts for both engines
            vocab = _vocab(engine)
            system = [rng.randrange(3, vocab) for _ in range(cfg.shared_prefix_len)]
            prompts = [
                system + [rng.randrange(3, vocab) for _ in range(cfg.question_len)]
                for _ in range(cfg.num_prompts)
            ]
            _run_batch(engine, [[rng.randrange(3, vocab) for _ in range(8)]], 2)  # warm-up
            r = _run_batch(engine, prompts, cfg.output_len)
        outputs[name] = r.pop("outputs")
        r["prefill_tokens_per_s"] = r["prompt_tokens"] / r["prefill_s"]
        r["hit_rate"] = r["cached_tokens"] / r["prompt_tokens"]
        rows[name] = r
    return {
        "benchmark": "shared_prefix",
        "config": asdict(cfg),
        **rows,
        "prefill_speedup": rows["radix_cache"]["prefill_tokens_per_s"]
        / rows["no_cache"]["prefill_tokens_per_s"],
        "same_greedy_outputs": outputs["radix_cache"] == outputs["no_cache"],
    }


def multi_turn(make_engine: EngineFactory, cfg: PrefixBenchConfig) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for policy in ("round_robin", "cache_aware"):
        with make_engine(router_policy=policy) as engine:
            rng = random.Random(cfg.seed)
            vocab = _vocab(engine)
            convs = [
                [rng.randrange(3, vocab) for _ in range(cfg.shared_prefix_len)]
                for _ in range(cfg.num_prompts)
            ]
            totals = {"prompt_tokens": 0, "cached_tokens": 0, "elapsed_s": 0.0}
            for _ in range(cfg.num_turns):  # a turn of every conversation, then the next
                for c in convs:
                    c += [rng.randrange(3, vocab) for _ in range(cfg.question_len)]
                rng.shuffle(convs)  # users answer in their own time: turns arrive in any order
                r = _run_batch(engine, convs, cfg.output_len)
                for c, out in zip(convs, r["outputs"]):
                    c += out  # the answer is part of the next turn's prompt
                for key in totals:
                    totals[key] += r[key]
        totals["hit_rate"] = totals["cached_tokens"] / totals["prompt_tokens"]
        rows[policy] = totals
    rr, ca = rows["round_robin"]["hit_rate"], rows["cache_aware"]["hit_rate"]
    return {
        "benchmark": "multi_turn",
        "config": asdict(cfg),
        **rows,
        "cache_aware_over_round_robin_hit_rate": ca / rr if rr else None,
    }
