"""The prefix-cache benchmarks run end to end (figures are the benchmark's, not asserted)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dpattn.entrypoints.engine import Engine
from dpattn.tools.bench_prefix import PrefixBenchConfig, multi_turn, shared_prefix


def test_shared_prefix_and_multi_turn_benchmarks(tiny_models: dict[str, Path]) -> None:
    model = str(tiny_models["qwen3_moe"])

    def make(tp: int, dp: int) -> Any:
        return lambda **o: Engine(model, tp, dp, backend="thread", **o)

    shared = shared_prefix(make(1, 1), PrefixBenchConfig(6, 64, 4, 2))
    assert shared["same_greedy_outputs"]
    assert shared["no_cache"]["cached_tokens"] == 0
    # All six arrive at once: the first step (256 tokens) computes the system prompt for up to
    # four; every later-admitted one finds it cached (how many depends on arrival timing)
    assert shared["radix_cache"]["cached_tokens"] >= 2 * 64
    turns = multi_turn(make(2, 2), PrefixBenchConfig(5, 32, 8, 4, num_turns=3))
    assert turns["round_robin"]["prompt_tokens"] == turns["cache_aware"]["prompt_tokens"]
    # cache_aware keeps a conversation on one group: a later turn misses only its new question
    # and the previous answer's last token (never run through the model)
    later = turns["cache_aware"]["prompt_tokens"] - 5 * (32 + 8)
    assert turns["cache_aware"]["cached_tokens"] == later - 5 * 2 * (8 + 1)
