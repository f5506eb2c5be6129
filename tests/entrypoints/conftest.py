"""Fixtures of the entrypoints tests: one in-process server per test module that asks for it
(thread backend, tp=2 dp=2) and an `openai` client for it."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from server_harness import ServerThread, serving

from dpattn.entrypoints.engine import Engine
from dpattn.models.tiny import ensure_default_model


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    engine = Engine(str(ensure_default_model()), 2, 2, backend="thread")  # the tiny model
    with serving(engine) as srv:
        yield srv


@pytest.fixture
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
