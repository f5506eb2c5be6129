"""In-process HTTP servers for the disaggregation tests: a prefill server, a decode server, the
PD router in front of them, and a colocated server as the reference (thread-backend engines,
uvicorn in background threads)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from proc_harness import Uvicorn, free_port

from dpattn.disaggregation.pd_router import PDRouter, PrefillServer, create_router_app
from dpattn.entrypoints.engine import Engine
from dpattn.entrypoints.http_server import create_app


class PDStack:
    """prefill (tp, dp) + decode (tp, dp) servers and the router; `engines` to check pools.
    `prefill_options`: the prefill server's own (its --pp-size, say)."""

    def __init__(
        self,
        model: Path,
        prefill: tuple[int, int],
        decode: tuple[int, int],
        backend: str = "thread",
        prefill_options: dict[str, Any] | None = None,
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
            **{**common, **(prefill_options or {})},
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
