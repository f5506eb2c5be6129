"""Offline benchmark report: DP-attention costs, the side-by-side transformers comparison and
the constrained-decoding shares (--constrained-share)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpattn.cli import _constrained, _run, main
from dpattn.cli_parser import build_parser
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


def test_constrained_share_side_by_side(
    tiny_models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """`--constrained-share 0 1`: both shares on the same engine; at 1 every request and every
    sampled token is under the grammar, which cannot end early, and the masks cost time."""
    argv = ["bench", "--model-path", str(tiny_models["qwen3_moe"]), "--backend", "thread"]
    argv += ["--tp", "2", "--dp", "2", "--num-prompts", "6", "--input-len", "5"]
    argv += ["--output-len", "7", "--constrained-share", "0", "1", "--compare-repeats", "2"]
    assert build_parser().parse_args(argv).constrained_share == [0.0, 1.0]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "grammar ms / constrained row" in out  # the table, before the JSON report
    report = json.loads(out.strip().splitlines()[-1])
    none, full = report["shares"]
    assert report["repeats"] == 2 and len(full["output_tokens_per_s_each"]) == 2
    assert json.loads(report["schema"])["minItems"] == 7
    for row in (none, full):
        assert row["output_tokens"] == 6 * 7 and row["output_tokens_per_s"] > 0
        assert row["step_s_mean"] > 0 and row["forward_steps"] > 0
    assert none["constrained_requests"] == none["constrained_rows"] == 0
    assert none["grammar_s_per_step"] == 0 and none["grammar_s_per_constrained_row"] is None
    assert full["constrained_requests"] == 6 and full["constrained_rows"] == 6 * 7
    assert full["grammar_s_per_step"] > 0 and full["grammar_s_per_constrained_row"] > 0
    assert 0 < full["grammar_share_of_step_time"] < 1
    assert none["output_tokens_per_s_vs_share_0"] == 1.0


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--constrained-share", "0", "1.5"], "fractions in \\[0, 1\\]"),
        (["--constrained-share", "1", "--output-len", "0"], "needs --output-len >= 1"),
        (["--constrained-share", "0.5", "0.5"], "values must differ"),
        (["--constrained-share", "1", "--compare-routing"], "offline bench only"),
    ],
)
def test_constrained_share_checked_first(flags: list[str], message: str) -> None:
    args = build_parser().parse_args(["bench", "--model-path", "/nonexistent/model", *flags])
    with pytest.raises(ValueError, match=message):
        _run(args)  # refused before any model is resolved


def test_lone_zero_share_is_the_plain_bench() -> None:
    args = build_parser().parse_args(["bench", "--constrained-share", "0"])
    assert args.constrained_share == [0.0] and not _constrained(args)
    assert build_parser().parse_args(["bench"]).constrained_share is None
