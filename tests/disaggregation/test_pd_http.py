"""Prefill server + decode server + PD router over HTTP, driven by the official `openai`
client and /generate: greedy tokens and logprobs equal one colocated server's."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from pd_servers import PDStack, wait_for
from proc_harness import Uvicorn, free_port
from prometheus_client.parser import text_string_to_metric_families

from dpattn.disaggregation.pd_router import PDRouter, PrefillServer, create_router_app
from dpattn.entrypoints.engine import Engine
from dpattn.entrypoints.http_server import create_app

PROMPTS = [[5, 17, 99, 3], list(range(3, 40)), [42]]  # the second: chunked prefill (size 8)


@pytest.fixture(scope="module")
def colocated(tiny_models: dict[str, Path]) -> Iterator[str]:
    engine = Engine(
        str(tiny_models["llama"]),
        1,
        1,
        backend="thread",
        kv_pool_tokens=256,
        disable_radix_cache=True,
    )
    srv = Uvicorn(create_app(engine))
    try:
        yield srv.url
    finally:
        srv.stop()
        engine.shutdown()


def generate(url: str, ids: list[int], max_new: int, **sp: object) -> dict:
    body = {
        "input_ids": ids,
        "sampling_params": {"max_new_tokens": max_new, "temperature": 0, **sp},
        "return_logprob": True,
    }
    resp = httpx.post(url + "/generate", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def metrics(url: str) -> dict[tuple[str, str], float]:
    """Samples summed over DP groups, keyed by (name, outcome label)."""
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for sample in family.samples:
            key = (sample.name, sample.labels.get("outcome", ""))
            out[key] = out.get(key, 0.0) + sample.value
    return out


def same(a: dict, b: dict) -> None:
    assert a["output_ids"] == b["output_ids"]
    assert a["meta_info"]["finish_reason"] == b["meta_info"]["finish_reason"]
    la = [x[0] for x in a["meta_info"]["output_token_logprobs"]]
    lb = [x[0] for x in b["meta_info"]["output_token_logprobs"]]
    assert la == pytest.approx(lb, abs=1e-4)


# (1,1)->(2,2) on thread ranks by default; the other two (also covered over the schedulers in
# test_pd_protocol.py) with DPATTN_PD_FULL=1; all three on gloo rank processes with
# DPATTN_PD_GLOO=1 (~2 min).
FULL = os.environ.get("DPATTN_PD_FULL") == "1"
GLOO = os.environ.get("DPATTN_PD_GLOO") == "1"
PAIRS = [((1, 1), (2, 2)), ((2, 2), (2, 1)), ((2, 1), (2, 2))]
LAYOUTS = [(*PAIRS[0], "thread")] + [(*p, "thread") for p in PAIRS[1:] if FULL]
LAYOUTS += [(*p, "gloo") for p in PAIRS if GLOO]


@pytest.mark.parametrize("prefill,decode,backend", LAYOUTS, ids=str)
def test_router_matches_colocated(
    tiny_models: dict[str, Path],
    colocated: str,
    prefill: tuple[int, int],
    decode: tuple[int, int],
    backend: str,
) -> None:
    stack = PDStack(tiny_models["llama"], prefill, decode, backend=backend)
    try:
        url = stack.router.url
        for ids in PROMPTS:
            same(generate(url, ids, 6), generate(colocated, ids, 6))
        same(generate(url, PROMPTS[0], 1), generate(colocated, PROMPTS[0], 1))  # one token
        # A stop token as the first token: the decode side stops at once.
        first = generate(colocated, PROMPTS[0], 1)["output_ids"][0]
        got = generate(url, PROMPTS[0], 6, stop_token_ids=[first])
        assert got["output_ids"] == [first]
        assert got["meta_info"]["finish_reason"] == {"type": "stop", "matched": first}

        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        ref = openai.OpenAI(base_url=colocated + "/v1", api_key="x", max_retries=0, timeout=60)
        kw = dict(model=None, prompt=PROMPTS[1], max_tokens=5, temperature=0, logprobs=1)
        a = client.completions.create(**kw)  # type: ignore[call-overload]
        b = ref.completions.create(**kw)  # type: ignore[call-overload]
        assert a.choices[0].text == b.choices[0].text
        assert a.choices[0].logprobs.token_logprobs == pytest.approx(
            b.choices[0].logprobs.token_logprobs, abs=1e-4
        )
        # n = 2: one room per choice (room + i), derived alike on both servers.
        two = client.completions.create(**kw, n=2)  # type: ignore[call-overload]
        assert [c.text for c in two.choices] == [b.choices[0].text] * 2
        # Scoring only (echo, logprobs, max_tokens 0): the prompt's logprobs, no token.
        score = dict(model=None, prompt=PROMPTS[1], max_tokens=0, echo=True, logprobs=1)
        a_score = client.completions.create(**score)  # type: ignore[call-overload]
        b_score = ref.completions.create(**score)  # type: ignore[call-overload]
        assert a_score.choices[0].text == b_score.choices[0].text
        assert a_score.usage.completion_tokens == 0
        assert a_score.choices[0].logprobs.token_logprobs[1:] == pytest.approx(
            b_score.choices[0].logprobs.token_logprobs[1:], abs=1e-4
        )
        chunks = client.completions.create(**kw, stream=True)  # type: ignore[call-overload]
        assert "".join(c.choices[0].text for c in chunks if c.choices) == b.choices[0].text
        msgs = [{"role": "user", "content": "Hello there"}]
        chat = dict(model=None, messages=msgs, max_tokens=5, temperature=0)
        a_chat = client.chat.completions.create(**chat)  # type: ignore[call-overload]
        b_chat = ref.chat.completions.create(**chat)  # type: ignore[call-overload]
        assert a_chat.choices[0].message.content == b_chat.choices[0].message.content
        for engine in stack.engines:
            assert wait_for(lambda e=engine: e.kv_pools_full()), "KV slots leaked"
        for srv in (stack.prefill, stack.decode):  # every request's KV, counted on both sides
            m = metrics(srv.url)
            assert m[("dpattn_disagg_transfers_total", "success")] >= 6
            assert m[("dpattn_disagg_transfer_bytes_total", "")] > 0
            assert m[("dpattn_disagg_transfers_total", "failed")] == 0
    finally:
        stack.close()


def test_router_faults_and_refusals(tiny_models: dict[str, Path]) -> None:
    """A prefill server that does not answer ends the request (502, or an error event in a
    stream) and the decode side frees it; a disaggregated server refuses a request that did not
    come through the router (400)."""
    stack = PDStack(tiny_models["llama"], (1, 1), (1, 1))
    dead = Uvicorn(
        create_router_app(
            PDRouter([PrefillServer(f"http://127.0.0.1:{free_port()}")], [stack.decode.url])
        )
    )
    try:
        resp = httpx.post(stack.decode.url + "/generate", json={"input_ids": [5, 6]}, timeout=30)
        assert resp.status_code == 400 and "pd-disaggregation" in resp.text
        body = {"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0}
        resp = httpx.post(dead.url + "/v1/completions", json=body, timeout=30)
        assert resp.status_code == 502 and "prefill server did not answer" in resp.text
        with httpx.stream(
            "POST", dead.url + "/v1/completions", json={**body, "stream": True}, timeout=30
        ) as stream:
            text = "".join(stream.iter_text())
        assert "prefill server did not answer" in text and text.rstrip().endswith("[DONE]")
        assert wait_for(stack.decode_engine.kv_pools_full), "the decode side kept the KV"
        assert wait_for(lambda: not stack.decode_engine._pending), "requests never ended"
    finally:
        dead.stop()
        stack.close()
