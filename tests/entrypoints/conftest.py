"""Fixtures of the entrypoints tests: one in-process server per test module that asks for it
(thread backend, tp=2 dp=2) and an `openai` client for it."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from server_harness import ServerThread

from dpattn.entrypoints.engine import Engine
from dpattn.models.tiny import ensure_default_model


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    engine = Engine(str(ensure_default_model()), 2, 2, backend="thread")  # the tiny model
    srv = ServerThread(engine)
    try:
        yield srv
        assert srv.state.in_flight == 0
        assert engine.kv_free == engine.kv_total, "KV slots leaked"
        assert not engine._pending, "requests were never released"
    finally:
        srv.stop()
        engine.shutdown()


@pytest.fixture
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
