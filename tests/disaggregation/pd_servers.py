"""In-process HTTP servers for the disaggregation tests: a prefill server, a decode server, the
PD router in front of them, and a colocated server as the reference (thread-backend engines,
uvicorn in background threads)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from dpattn.disaggregation.pd_router import PDRouter, PrefillServer, create_router_app
from dpattn.entrypoints.engine import Engine
from dpattn.entrypoints.http_server import create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Uvicorn:
    def __init__(self, app: FastAPI) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
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


class PDStack:
    """prefill (tp, dp) + decode (tp, dp) servers and the router; `engines` to check pools."""

    def __init__(
        self,
        model: Path,
        prefill: tuple[int, int],
        decode: tuple[int, int],
        backend: str = "thread",
        **options: Any,
    ) -> None:
        self.bootstrap_port = free_port()
        # No prefix cache: every KV slot must come back to the pool (the strict leak check).
        common = dict(
            backend=backend,
            kv_pool_tokens=256,
            chunked_prefill_size=8,
            disable_radix_cache=True,
            **options,
        )
        self.prefill_engine = Engine(
            str(model),
            *prefill,
            disaggregation_mode="prefill",
            disaggregation_bootstrap_port=self.bootstrap_port,
            **common,
        )
        self.decode_engine = Engine(
            str(model),
            *decode,
            disaggregation_mode="decode",
            disaggregation_heartbeat_s=0.2,
            **common,
        )
        self.prefill = Uvicorn(create_app(self.prefill_engine))
        self.decode = Uvicorn(create_app(self.decode_engine))
        router = PDRouter([PrefillServer(self.prefill.url, self.bootstrap_port)], [self.decode.url])
        self.router = Uvicorn(create_router_app(router))

    @property
    def engines(self) -> list[Engine]:
        return [self.prefill_engine, self.decode_engine]

    def close(self) -> None:
        for srv in (self.router, self.decode, self.prefill):
            srv.stop()
        for engine in self.engines:
            engine.shutdown()


def wait_for(cond: Any, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
