"""`dpattn bench --base-url` as a newcomer reads it (issue 26): no HTTP client log line per
request over the progress bar, a summary table at the end, and the JSON report in --output."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from server_harness import MODEL, ServerThread

from dpattn.cli import _run, build_parser

PROMPTS = 6


def test_online_bench_prints_a_table_and_no_request_log(
    server: ServerThread,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    out = tmp_path / "report.json"
    argv = ["bench", "--base-url", server.url, "--num-prompts", str(PROMPTS), "--input-len", "4"]
    argv += ["--output-len", "3", "--concurrency", "3", "--output", str(out)]
    with caplog.at_level(logging.INFO):  # as `dpattn` logs by default
        assert _run(build_parser().parse_args(argv)) == 0
    http_log = [r.getMessage() for r in caplog.records if r.name.startswith(("httpx", "httpcore"))]
    assert http_log == []  # httpx logs every request at INFO unless quieted
    assert logging.getLogger("httpx").level == logging.NOTSET  # and only for the run

    report = json.loads(out.read_text())
    assert report["completed"] == PROMPTS and report["failed"] == 0, report["errors"]
    stdout = capsys.readouterr().out
    lines = stdout.splitlines()
    assert not any(line.lstrip().startswith("{") for line in lines), stdout  # no JSON line
    assert lines[0].startswith(f"{MODEL} (") and "concurrency 3" in lines[1]
    rows = {line.split("  ")[0].strip(): line.split() for line in lines if "  " in line}
    assert rows["completed requests"][-1] == str(PROMPTS)
    assert rows["failed requests"][-1] == "0"
    assert rows["ms"][1:] == ["mean", "p50", "p90", "p99", "max"]
    ttft = rows["TTFT"][1:]
    assert len(ttft) == 5 and float(ttft[1]) == pytest.approx(
        report["ttft_s"]["p50"] * 1e3, abs=0.1
    )
    assert lines[-1] == f"full report (JSON): written to {out}"
