"""The online bench's plot (issue 12): a title naming model, dtype, layout and load, and three
panels (throughput over time, TTFT and inter-token latency distributions), checked on the
figure's axes. Records are built by hand: the plot is a pure function of them."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from dpattn.tools.bench_online import OnlineBenchConfig, RequestRecord, figure, plot, plot_title


def records(n: int = 32) -> list[RequestRecord]:
    rng = random.Random(0)
    out = []
    for _ in range(n):  # all arrive at once, as the bench's default load
        ttft = rng.uniform(0.05, 0.4)
        times = [ttft + 0.02 * i + rng.uniform(0, 0.005) for i in range(16)]
        out.append(RequestRecord(start=0.0, ttft=ttft, end=times[-1], token_times=times))
    return out


def report(**cfg: Any) -> dict[str, Any]:
    config = OnlineBenchConfig("http://x", **cfg).__dict__
    return {
        "model": "gemma-3-270m",
        "dtype": "float32",
        "tp_size": 2,
        "dp_size": 2,
        "config": config,
    }


def test_title_names_model_layout_and_load() -> None:
    title = plot_title(report(num_prompts=32))
    assert title.startswith("gemma-3-270m (float32), tp 2 dp 2\n")
    assert "32 prompts, all at once, 32 words in, 16 tokens out" in title
    assert "4.0 req/s" in plot_title(report(request_rate=4.0))
    assert "concurrency 8" in plot_title(report(concurrency=8))


def test_three_panels(tmp_path: Path) -> None:
    recs = records()
    fig = figure(recs, elapsed=0.8, title="T")
    tput, ttft, itl = fig.axes
    assert fig._suptitle.get_text() == "T"
    assert tput.get_title() == "output throughput over time"
    assert (tput.get_xlabel(), tput.get_ylabel()) == ("time since start (s)", "tokens / s")
    total = sum(p.get_height() * p.get_width() for p in tput.patches)
    assert abs(total - 32 * 16) < 1e-6  # every token lands in a time bucket
    assert ttft.get_title() == "time to first token (32 samples)"
    assert itl.get_title() == "inter-token latency (480 samples)"
    for ax, n in ((ttft, 32), (itl, 480)):
        assert ax.get_xlabel() == "ms" and ax.get_ylabel() == "count"
        assert sum(p.get_height() for p in ax.patches) == n  # a histogram of every sample
        assert [t.get_text().split()[0] for t in ax.get_legend().get_texts()] == ["p50", "p99"]
    out = tmp_path / "bench.png"
    plot(recs, 0.8, str(out), "T")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
