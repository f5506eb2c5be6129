"""The HTTP server harness shared by the entrypoints tests: uvicorn serving create_app(engine)
in a background thread, and helpers for Prometheus metrics and OpenAI streams."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import httpx
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from dpattn.entrypoints.engine import Engine
from dpattn.entrypoints.http_server import create_app

MODEL = "tiny-qwen3-moe"  # the default model's directory name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerThread:
    """uvicorn serving create_app(engine) on a free loopback port, in a background thread."""

    def __init__(self, engine: Engine, **kwargs: Any) -> None:
        self.app = create_app(engine, **kwargs)
        self.state = self.app.state.dpattn
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


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


def wait_healthy(proc: Any, url: str, timeout: float = 120.0) -> None:
    """Until a `dpattn serve` subprocess answers /health (fails with its output if it exits)."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else proc.returncode
        assert time.monotonic() < deadline, "server did not come up"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.3)
