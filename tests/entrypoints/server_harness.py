"""The HTTP server harness shared by the entrypoints tests: uvicorn serving create_app(engine)
in a background thread, and helpers for Prometheus metrics and OpenAI streams."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
from proc_harness import Uvicorn
from prometheus_client.parser import text_string_to_metric_families

from dpattn.entrypoints.engine import Engine
from dpattn.entrypoints.http_server import create_app

MODEL = "tiny-qwen3-moe"  # the default model's directory name


@contextlib.contextmanager
def serving(engine: Engine, **kwargs: Any) -> Iterator[ServerThread]:
    """A server on `engine` for a test module; at the end nothing may be left in flight."""
    srv = ServerThread(engine, **kwargs)
    try:
        yield srv
        assert srv.state.in_flight == 0
        assert engine.kv_free == engine.kv_total, "KV slots leaked"
        assert not engine._pending, "requests were never released"
    finally:
        srv.stop()
        engine.shutdown()


class ServerThread(Uvicorn):
    """uvicorn serving create_app(engine) on a free loopback port, in a background thread."""

    def __init__(self, engine: Engine, **kwargs: Any) -> None:
        self.app = create_app(engine, **kwargs)
        self.state = self.app.state.dpattn
        super().__init__(self.app)


def _metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(url + "/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _m(metrics: dict[Any, float], name: str, **labels: str) -> float:
    return metrics[(name, tuple(sorted(labels.items())))]


def _rank(d: int, **extra: str) -> dict[str, str]:
    return dict(dp_rank=str(d), tp_rank="0", **extra)


def _wait_for(cond: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _stream_texts(stream: Any, chat: bool = False) -> tuple[dict[int, str], dict[int, str], Any]:
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        for ch in chunk.choices:
            piece = (ch.delta.content if chat else ch.text) or ""
            if not ch.finish_reason:  # only the end may keep a dangling partial character
                assert not piece.endswith("\ufffd"), "a split multi-byte character was streamed"
            texts[ch.index] = texts.get(ch.index, "") + piece
            if ch.finish_reason:
                reasons[ch.index] = ch.finish_reason
    return texts, reasons, usage


def reported_kv(line: str) -> tuple[int, int, int]:
    """(bytes per token per rank, tokens per DP group, tokens in the system) of the start-up
    line (`dpattn serve`'s print, the engine's log)."""
    m = re.search(
        r"KV cache: (\d+) bytes per token per rank, (\d+) tokens per DP group .*?"
        r"(\d+) tokens in the system",
        line,
    )
    assert m, line
    return int(m[1]), int(m[2]), int(m[3])
