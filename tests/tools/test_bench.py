"""Offline benchmark report: DP-attention costs and the side-by-side transformers comparison."""

from __future__ import annotations

from pathlib import Path

from dpattn.entrypoints.engine import Engine
from dpattn.tools.bench import BenchConfig, compare_with_transformers, run_offline


def test_offline_bench_report(tiny_models: dict[str, Path]) -> None:
    engine = Engine(str(tiny_models["qwen3_moe"]), 2, 2, backend="thread")
    rows = compare_with_transformers(engine, batch_sizes=(1, 4), new_tokens=4, repeats=2)
    report = run_offline(
        engine, BenchConfig(num_prompts=12, input_len=9, output_len=5, progress=False)
    )
    assert [r["batch"] for r in rows] == [1, 4]
    assert all(r["dpattn_tokens_per_s"] > 0 and r["transformers_tokens_per_s"] > 0 for r in rows)
    assert all(r["repeats"] == 2 and len(r["dpattn_over_transformers_each"]) == 2 for r in rows)
    assert report["forward_steps"]["extend"] >= 1 and report["forward_steps"]["decode"] >= 1
    assert report["padding_waste"] >= 1.0  # padded MLP rows per real token
    assert report["mlp_sync_s_per_step"] > 0 and report["bare_all_gather_s"] > 0
    assert report["latency_s"]["p99"] >= report["latency_s"]["p50"] > 0
