"""`dpattn bench --compare-dp-attention` end to end on a tiny GQA model at tp 2 (issue 24, item
7): the report's structure and invariants; the figures are the benchmark's, not asserted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dpattn.cli import _bench_defaults, _run, build_parser
from dpattn.entrypoints.engine import Engine
from dpattn.tools.bench_dp_attention import DpAttentionBenchConfig, compare_dp_attention

PROMPTS, INPUT, OUTPUT, DP_TOKENS = 6, 40, 4, 96  # 264 tokens of KV against 2 x 96 slots


def check_report(report: dict[str, Any], tp: int, num_prompts: int, output_len: int) -> None:
    dpa, tpa = report["dp_attention"], report["tp_attention"]
    assert dpa["layout"] == {"tp": tp, "dp": tp, "attn_tp": 1}
    assert tpa["layout"] == {"tp": tp, "dp": 1, "attn_tp": tp}
    for row in (dpa, tpa):
        # the same KV memory per rank: as many whole tokens of it as fit
        assert row["kv_bytes_per_rank"] <= report["kv_bytes_per_rank"]
        assert (
            row["kv_bytes_per_rank"]
            > report["kv_bytes_per_rank"] - row["kv_bytes_per_token_per_rank"]
        )
        assert (
            row["kv_bytes_per_rank"]
            == row["kv_tokens_per_rank"] * row["kv_bytes_per_token_per_rank"]
        )
        assert 0 < row["peak_kv_tokens_system"] <= row["kv_tokens_system"]
        assert 0 < row["peak_running_requests"] <= num_prompts
        assert row["completed"] == num_prompts and row["output_lens"] == [output_len]
        assert row["cached_prompt_tokens"] == 0  # distinct prompts: the cache shares nothing
        assert row["retractions"] >= 0
        assert set(row["ttft_s"]) >= {"mean", "p50", "p99"} and row["output_tokens_per_s"] > 0
    assert dpa["kv_tokens_system"] == tp * dpa["kv_tokens_per_rank"]  # each group its own
    assert tpa["kv_tokens_system"] == tpa["kv_tokens_per_rank"]  # one group over all ranks
    # GQA (2 KV heads, tp 2): a TP-attention rank holds half the heads, so half the bytes per
    # token, twice the tokens: the system's capacity is the same under both layouts.
    assert dpa["kv_bytes_per_token_per_rank"] == tp * tpa["kv_bytes_per_token_per_rank"]
    assert dpa["kv_tokens_system"] == tpa["kv_tokens_system"]
    assert report["dp_over_tp"]["kv_tokens_system"] == 1.0


def test_compare_dp_attention_cli(
    tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI's path (thread ranks: seconds): --max-total-tokens slots of the DP layout set
    the KV bytes per rank; a table, then one JSON line, also written to --json-out."""
    out = tmp_path / "report.json"
    argv = ["bench", "--compare-dp-attention", "--model-path", str(tiny_models["qwen3_moe"])]
    argv += ["--tp", "2", "--backend", "thread", "--max-total-tokens", str(DP_TOKENS)]
    argv += ["--num-prompts", str(PROMPTS), "--input-len", str(INPUT)]
    argv += ["--output-len", str(OUTPUT), "--json-out", str(out)]
    assert _run(build_parser().parse_args(argv)) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads(lines[-1])
    assert report == json.loads(out.read_text())
    assert report["config"]["max_total_tokens"] == DP_TOKENS
    assert report["dp_attention"]["kv_tokens_per_rank"] == DP_TOKENS
    per_token = report["dp_attention"]["kv_bytes_per_token_per_rank"]
    assert report["kv_bytes_per_rank"] == DP_TOKENS * per_token
    check_report(report, 2, PROMPTS, OUTPUT)
    table = "\n".join(lines[:-1])
    assert "dp_attention" in table and "tp_attention" in table
    for label in ("KV bytes / token / rank", "peak KV tokens held, system", "retractions"):
        assert label in table
    assert "DP / TP attention: system tokens 1.00x" in table


def test_compare_dp_attention_by_bytes(tiny_models: dict[str, Path]) -> None:
    """--kv-bytes-per-rank: each layout's bytes per token asked from a probe engine."""
    model = str(tiny_models["qwen3_moe"])

    def make(tp: int, dp: int, **options: Any) -> Engine:
        return Engine(model, tp, dp, backend="thread", **options)

    cfg = DpAttentionBenchConfig(2, 4, 24, 3, kv_bytes_per_rank=100_000)
    report = compare_dp_attention(make, cfg)
    check_report(report, 2, 4, 3)
    assert report["kv_bytes_per_rank"] == 100_000
    with pytest.raises(ValueError, match="hold 0 tokens"):
        compare_dp_attention(make, DpAttentionBenchConfig(2, 1, 8, 1, kv_bytes_per_rank=100))


def test_compare_dp_attention_flags() -> None:
    args = build_parser().parse_args(["bench", "--compare-dp-attention"])
    with pytest.raises(ValueError, match="not both"):
        _run(
            build_parser().parse_args(
                ["bench", "--compare-dp-attention", "--max-total-tokens", "8"]
                + ["--kv-bytes-per-rank", "8"]
            )
        )
    _bench_defaults(args)
    assert (args.tp_size, args.input_len, args.output_len) == (4, 192, 32)
    plain = build_parser().parse_args(["bench"])
    _bench_defaults(plain)
    assert (plain.tp_size, plain.input_len, plain.output_len) == (1, 32, 16)
