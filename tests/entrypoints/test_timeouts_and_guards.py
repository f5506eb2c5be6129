"""Timeouts abort (issue 11, item 4) and the server's gates (item 5): API key, body size limit,
loopback by default."""

from __future__ import annotations

import inspect
from collections.abc import Iterator

import httpx
import pytest
from server_harness import ServerThread, _wait_for

from dpattn.cli import build_parser
from dpattn.entrypoints.http_server import serve
from dpattn.executor.sampling_params import SamplingParams

LONG = SamplingParams(max_new_tokens=500, ignore_eos=True)  # seconds of decoding


def _freed(srv: ServerThread, rid: str | None = None) -> bool:
    engine = srv.state.engine
    return engine.kv_pools_full() and (rid is None or rid not in engine._pending)


def test_result_and_stream_timeouts_abort_and_free_kv(server: ServerThread) -> None:
    engine = server.state.engine
    rid = engine.submit([1, 2, 3], LONG)
    with pytest.raises(TimeoutError, match="aborted"):
        engine.result(rid, timeout=0.2)
    assert _wait_for(lambda: _freed(server, rid)), "the timed-out request kept its KV"
    rid = engine.submit([4, 5, 6], LONG)
    with pytest.raises(TimeoutError, match="aborted"):
        for _ in engine.stream(rid, timeout=0.2):
            pass
    assert _wait_for(lambda: _freed(server, rid))


@pytest.fixture
def timeout_server(server: ServerThread) -> Iterator[ServerThread]:
    srv = ServerThread(server.state.engine, request_timeout_s=0.3)
    try:
        yield srv
    finally:
        srv.stop()


def test_http_request_timeout_is_504_and_aborts(timeout_server: ServerThread) -> None:
    body = {"prompt": "Hi", "max_tokens": 500, "ignore_eos": True}
    r = httpx.post(timeout_server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
    with httpx.stream(
        "POST", timeout_server.url + "/v1/completions", json={**body, "stream": True}, timeout=60
    ) as s:
        events = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert '"request_timeout"' in events[-2] and events[-1] == "data: [DONE]"
    assert _wait_for(lambda: _freed(timeout_server) and timeout_server.state.in_flight == 0)
    ok = httpx.post(timeout_server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert ok.status_code == 200


def test_api_key_and_body_limit(server: ServerThread) -> None:
    srv = ServerThread(server.state.engine, api_key="s3cret", max_body_bytes=2048)
    try:
        url = srv.url + "/v1/models"
        assert httpx.get(url).status_code == 401
        r = httpx.get(url, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url, headers={"Authorization": "Basic s3cret"}).status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert httpx.get(url, headers=auth).status_code == 200
        assert httpx.get(srv.url + "/health").status_code == 200  # a supervisor's probe
        small = {"prompt": "Hi", "max_tokens": 2}
        assert httpx.post(srv.url + "/v1/completions", json=small, headers=auth).status_code == 200
        big = {"prompt": "x" * 4000, "max_tokens": 2}
        r = httpx.post(srv.url + "/v1/completions", json=big, headers=auth)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams in
            yield b'{"prompt": "'
            for _ in range(10):
                yield b"y" * 500
            yield b'"}'

        r = httpx.post(srv.url + "/v1/completions", content=chunks(), headers=auth)
        assert r.status_code == 413
    finally:
        srv.stop()
    assert _wait_for(lambda: _freed(server))


def test_binds_loopback_by_default() -> None:
    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"
    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"
