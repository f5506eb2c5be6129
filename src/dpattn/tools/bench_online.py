"""Online benchmark: a request stream (by rate or concurrency) against a running server's
OpenAI-compatible /v1/completions, streamed; a summary table, a JSON report and a PNG plot."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
from tqdm import tqdm

from dpattn.tools.bench import percentiles

_WORDS = "the of and to in is was for on with as by at from that this it are be or an".split()


@dataclass
class OnlineBenchConfig:
    base_url: str
    num_prompts: int = 64
    input_len: int = 32  # words per prompt
    output_len: int = 16
    request_rate: float | None = None  # Poisson arrivals per second; None: all at once
    concurrency: int | None = None  # cap on requests in flight
    seed: int = 0
    model: str | None = None
    progress: bool = True


@dataclass
class RequestRecord:
    start: float
    ttft: float | None = None
    end: float | None = None
    token_times: list[float] = field(default_factory=list)
    error: str | None = None


async def _one(
    client: httpx.AsyncClient, cfg: OnlineBenchConfig, model: str, prompt: str, t0: float
) -> RequestRecord:
    rec = RequestRecord(start=time.perf_counter() - t0)
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": cfg.output_len,
        "stream": True,
        "temperature": 0,
    }
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                rec.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return rec
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    now = time.perf_counter() - t0
                    rec.token_times.append(now)
                    if rec.ttft is None:
                        rec.ttft = now - rec.start
    except httpx.HTTPError as e:
        rec.error = f"{type(e).__name__}: {e}"
    rec.end = time.perf_counter() - t0
    return rec


async def _run(cfg: OnlineBenchConfig) -> tuple[list[RequestRecord], float, dict[str, Any]]:
    rng = random.Random(cfg.seed)
    prompts = [
        " ".join(rng.choice(_WORDS) for _ in range(cfg.input_len)) for _ in range(cfg.num_prompts)
    ]
    limits = httpx.Limits(max_connections=cfg.concurrency or cfg.num_prompts)
    async with httpx.AsyncClient(
        base_url=cfg.base_url.rstrip("/"), timeout=600, limits=limits
    ) as client:
        card = (await client.get("/v1/models")).json()["data"][0]
        model = cfg.model or card["id"]
        gate = asyncio.Semaphore(cfg.concurrency or cfg.num_prompts)
        # disable=None: no bar where stderr is not a terminal (it would repaint into a log)
        disable = None if cfg.progress else True
        bar = tqdm(total=cfg.num_prompts, desc="requests", disable=disable, leave=False)
        t0 = time.perf_counter()

        async def launch(prompt: str) -> RequestRecord:
            async with gate:
                rec = await _one(client, cfg, model, prompt, t0)
            bar.update(1)
            return rec

        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(launch(prompt)))
            if cfg.request_rate:
                await asyncio.sleep(rng.expovariate(cfg.request_rate))
        records = await asyncio.gather(*tasks)
        bar.close()
        return list(records), time.perf_counter() - t0, card


@contextmanager
def quiet_http_client() -> Iterator[None]:
    """httpx logs every request at INFO (`HTTP Request: POST ... "HTTP/1.1 200 OK"`): one line
    per request over the progress bar. Off for the run, unless the program logs at debug."""
    logger = logging.getLogger("httpx")
    level = logger.level
    if not logger.isEnabledFor(logging.DEBUG):
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def run_online(cfg: OnlineBenchConfig, plot_path: str | None = None) -> dict[str, Any]:
    with quiet_http_client():
        records, elapsed, card = asyncio.run(_run(cfg))
    ok = [r for r in records if r.error is None and r.end is not None]
    itl = [b - a for r in ok for a, b in zip(r.token_times, r.token_times[1:])]
    tokens = sum(len(r.token_times) for r in ok)
    report = {
        # what the server runs (its /v1/models card): the report names model, dtype and layout
        "model": cfg.model or card["id"],
        "dtype": card.get("dtype"),
        "tp_size": card.get("tp_size"),
        "dp_size": card.get("dp_size"),
        "config": asdict(cfg),
        "elapsed_s": elapsed,
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "errors": sorted({r.error for r in records if r.error})[:5],
        "requests_per_s": len(ok) / elapsed,
        "output_tokens_per_s": tokens / elapsed,
        "latency_s": percentiles([r.end - r.start for r in ok]),  # type: ignore[operator]
        "ttft_s": percentiles([r.ttft for r in ok if r.ttft is not None]),
        "itl_s": percentiles(itl),
    }
    if plot_path:
        plot(ok, elapsed, plot_path, plot_title(report))
        report["plot"] = plot_path
    return report


def plot_title(report: dict[str, Any]) -> str:
    """Model, dtype and layout; the load (rate or concurrency, prompts, lengths)."""
    cfg = report["config"]
    load = (
        f"{cfg['request_rate']} req/s"
        if cfg["request_rate"]
        else f"concurrency {cfg['concurrency']}"
        if cfg["concurrency"]
        else "all at once"
    )
    return (
        f"{report['model']} ({report['dtype']}), tp {report['tp_size']} dp {report['dp_size']}\n"
        f"{cfg['num_prompts']} prompts, {load}, {cfg['input_len']} words in, "
        f"{cfg['output_len']} tokens out"
    )


def format_table(report: dict[str, Any]) -> str:
    """The report to read: what ran, the throughput, and the latency percentiles in ms (the
    layout of the DP-attention comparison's table: labels left, figures right-aligned)."""
    head = [
        ["completed requests", str(report["completed"])],
        ["failed requests", str(report["failed"])],
        ["elapsed s", f"{report['elapsed_s']:.2f}"],
        ["requests / s", f"{report['requests_per_s']:.2f}"],
        ["output tok / s", f"{report['output_tokens_per_s']:.1f}"],
    ]
    stats = ("mean", "p50", "p90", "p99", "max")
    grid = [["ms", *stats]]
    for label, key in (
        ("TTFT", "ttft_s"),
        ("inter-token latency", "itl_s"),
        ("request latency", "latency_s"),
    ):
        q = report[key]
        grid.append([label, *(f"{q[s] * 1e3:.1f}" if s in q else "-" for s in stats)])
    lines = [plot_title(report), "", *_aligned(head), "", *_aligned(grid)]
    lines += [f"error: {e}" for e in report["errors"]]
    if report.get("plot"):
        lines.append(f"plot: {report['plot']}")
    return "\n".join(lines)


def _aligned(table: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in table
    ]


def plot(records: list[RequestRecord], elapsed: float, path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = figure(records, elapsed, title)
    fig.savefig(path)
    plt.close(fig)


def figure(records: list[RequestRecord], elapsed: float, title: str = "") -> Any:
    """Three panels: output throughput over time, and the TTFT and inter-token latency
    distributions (histograms with p50 / p99 marked: readable whatever the arrival pattern)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tput, ax_ttft, ax_itl) = plt.subplots(3, 1, figsize=(8, 9))
    fig.suptitle(title)
    bins = max(1, min(60, int(elapsed / 0.25) + 1))  # 0.25 s buckets, at most 60
    width = max(elapsed, 1e-9) / bins
    per_bucket = [0] * bins
    for r in records:
        for t in r.token_times:
            per_bucket[min(int(t / width), bins - 1)] += 1
    ax_tput.bar([i * width for i in range(bins)], [n / width for n in per_bucket], width=width)
    ax_tput.set_title("output throughput over time")
    ax_tput.set_xlabel("time since start (s)")
    ax_tput.set_ylabel("tokens / s")
    ttft = [r.ttft * 1e3 for r in records if r.ttft is not None]
    itl = [(b - a) * 1e3 for r in records for a, b in zip(r.token_times, r.token_times[1:])]
    for ax, values, name in (
        (ax_ttft, ttft, "time to first token"),
        (ax_itl, itl, "inter-token latency"),
    ):
        ax.set_title(f"{name} ({len(values)} samples)")
        ax.set_xlabel("ms")
        ax.set_ylabel("count")
        if not values:
            continue
        ax.hist(values, bins=min(40, max(5, len(values) // 4)))
        q = percentiles(values)
        for key, style in (("p50", "--"), ("p99", ":")):
            ax.axvline(q[key], color="k", linestyle=style, label=f"{key} {q[key]:.1f} ms")
        ax.legend()
    fig.tight_layout()
    return fig
