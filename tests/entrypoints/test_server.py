"""The HTTP server end to end with the official `openai` client: streaming, concurrency,
disconnects, OpenAI-style errors, admission control, Prometheus metrics.

All tests share one in-process server (thread backend, tp=2 dp=2; the `server` fixture in
conftest.py) to spare the CPU; test_serve_cli.py runs `dpattn serve` with gloo rank processes.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from server_harness import MODEL, ServerThread, _m, _metrics, _rank, _stream_texts, _wait_for

from dpattn.entrypoints.http_server import create_app
from dpattn.models.tiny import make_tokenizer


# ---- OpenAI endpoints ----
def test_models_and_health(server: ServerThread, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_completion_stream_equals_non_stream(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(
        model=MODEL,
        prompt="Once upon a time",
        max_tokens=24,
        temperature=0.9,
        seed=7,
        n=2,
        extra_body={"ignore_eos": True},  # both choices run to max_tokens, whatever they draw
    )
    full = client.completions.create(**kw)
    assert [c.finish_reason for c in full.choices] == ["length", "length"]
    assert full.choices[0].text != full.choices[1].text  # choice i samples with seed + i
    assert full.usage.completion_tokens == 48
    stream = client.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    texts, reasons, usage = _stream_texts(stream)
    assert texts == {c.index: c.text for c in full.choices}
    assert reasons == {0: "length", 1: "length"}
    assert usage.model_dump() == full.usage.model_dump()


def test_chat_stream_equals_non_stream(client: openai.OpenAI) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "What time is it?"}]},
    ]
    kw: dict[str, Any] = dict(model=MODEL, messages=messages, max_tokens=20, seed=3)
    full = client.chat.completions.create(**kw)
    msg = full.choices[0].message
    assert msg.role == "assistant" and msg.content and full.choices[0].finish_reason == "length"
    tok = make_tokenizer()
    prompt = tok.apply_chat_template(
        [
            {"role": m["role"], "content": "What time is it?" if i else m["content"]}
            for i, m in enumerate(messages)
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert full.usage.prompt_tokens == len(tok.encode(prompt, add_special_tokens=False))
    stream = client.chat.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}
    )
    texts, reasons, usage = _stream_texts(stream, chat=True)
    assert texts == {0: msg.content} and reasons == {0: "length"}
    assert usage.completion_tokens == full.usage.completion_tokens == 20


def test_stop_strings_and_logprobs(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(model=MODEL, prompt="The quick brown fox", temperature=0)
    base = client.completions.create(**kw, max_tokens=20, logprobs=0).choices[0]
    lp = base.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 20 and max(lp.token_logprobs) <= 0
    stop = base.text[6:9]
    cut = base.text[: base.text.index(stop)]
    stopped = client.completions.create(**kw, max_tokens=20, stop=[stop]).choices[0]
    assert (stopped.text, stopped.finish_reason) == (cut, "stop")
    stream = client.completions.create(**kw, max_tokens=20, stop=stop, stream=True)
    assert _stream_texts(stream)[:2] == ({0: cut}, {0: "stop"})
    chat = client.chat.completions.create(  # greedy: an unseeded sample may end early
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        logprobs=True,
        temperature=0,
    ).choices[0]
    assert len(chat.logprobs.content) == 5
    raw = b"".join(bytes(t.bytes) for t in chat.logprobs.content)
    assert raw.decode(errors="replace") == chat.message.content


def test_native_generate_mirrors_engine(server: ServerThread, client: openai.OpenAI) -> None:
    sp = {"max_new_tokens": 10, "temperature": 0}
    one = httpx.post(
        server.url + "/generate",
        json={"text": "Hello there", "sampling_params": sp, "return_logprob": True, "dp_rank": 1},
    ).json()
    meta = one["meta_info"]
    assert meta["dp_rank"] == 1 and meta["completion_tokens"] == 10
    assert [t for _, t, _ in meta["output_token_logprobs"]] == one["output_ids"]
    ref = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=10, temperature=0)
    assert one["text"] == ref.choices[0].text
    batch = httpx.post(
        server.url + "/generate",
        json={"input_ids": [[5, 6, 7], [8, 9]], "sampling_params": sp, "dp_rank": [0, 1]},
    ).json()
    assert [b["meta_info"]["dp_rank"] for b in batch] == [0, 1]
    with httpx.stream(
        "POST",
        server.url + "/generate",
        json={"input_ids": [5, 6, 7], "sampling_params": sp, "stream": True},
    ) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    parts = [json.loads(e) for e in events[:-1]]
    assert parts[-1]["text"] == batch[0]["text"]  # SGLang's: each event's text is cumulative
    assert parts[-1]["meta_info"]["finish_reason"] == batch[0]["meta_info"]["finish_reason"]


def test_64_concurrent_streams(server: ServerThread, client: openai.OpenAI) -> None:
    prompts = [f"Number {i} and the city by the sea" for i in range(8)]
    kw: dict[str, Any] = dict(model=MODEL, max_tokens=12, temperature=0)
    expected = [client.completions.create(prompt=p, **kw).choices[0].text for p in prompts]

    async def one(aclient: openai.AsyncOpenAI, i: int) -> tuple[str, str | None]:
        stream = await aclient.completions.create(prompt=prompts[i % 8], stream=True, **kw)
        text, reason = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            reason = chunk.choices[0].finish_reason or reason
        return text, reason

    async def run() -> list[tuple[str, str | None]]:
        limits = httpx.Limits(max_connections=64)
        async with openai.AsyncOpenAI(
            base_url=server.url + "/v1",
            api_key="x",
            max_retries=0,
            http_client=openai.DefaultAsyncHttpxClient(limits=limits, timeout=60),
        ) as aclient:
            return await asyncio.gather(*(one(aclient, i) for i in range(64)))

    results = asyncio.run(run())
    assert results == [(expected[i % 8], "length") for i in range(64)]


def test_client_disconnect_aborts_and_frees_kv(server: ServerThread, client: openai.OpenAI) -> None:
    before = _metrics(server.url)
    assert _m(before, "dpattn_kv_cache_used_tokens", **_rank(1)) == 0
    stream = client.completions.create(
        model=MODEL,
        prompt="Once upon a time",
        max_tokens=400,
        stream=True,
        extra_body={"ignore_eos": True},
        extra_headers={"X-Data-Parallel-Rank": "1"},
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    during = _metrics(server.url)
    assert _m(during, "dpattn_kv_cache_used_tokens", **_rank(1)) > 0
    stream.close()  # the client goes away mid-stream

    def aborted() -> bool:
        m = _metrics(server.url)
        return (
            _m(m, "dpattn_kv_cache_used_tokens", **_rank(1)) == 0
            and m.get(
                (
                    "dpattn_requests_finished_total",
                    tuple(sorted(_rank(1, finish_reason="abort").items())),
                )
            )
            == before.get(
                (
                    "dpattn_requests_finished_total",
                    tuple(sorted(_rank(1, finish_reason="abort").items())),
                ),
                0,
            )
            + 1
        )

    assert _wait_for(aborted), "the disconnected request kept its KV slots"
    with pytest.raises(httpx.TimeoutException):  # non-streaming: the same on disconnect
        httpx.post(
            server.url + "/v1/completions",
            json={"prompt": "Hi", "max_tokens": 400, "ignore_eos": True, "dp_rank": 0},
            timeout=0.5,
        )
    assert _wait_for(lambda: server.state.engine.kv_free == server.state.engine.kv_total)
    assert _wait_for(lambda: server.state.in_flight == 0)
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=3).choices[0].text


BAD_INPUTS: list[tuple[str, Any, dict[str, str], int, str | None]] = [
    # (path, body (bytes: raw), headers, status, param)
    ("/v1/completions", b'{"prompt": "x",', {}, 400, None),
    ("/v1/completions", b"[1, 2]", {}, 400, None),
    ("/v1/completions", {"model": "gpt-9", "prompt": "x"}, {}, 404, "model"),
    (
        "/v1/chat/completions",
        {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]},
        {},
        404,
        "model",
    ),
    ("/v1/chat/completions", {"model": MODEL}, {}, 400, "messages"),
    ("/v1/chat/completions", {"messages": []}, {}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, {}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, {}, 400, "messages.0.role"),
    ("/v1/completions", {"model": MODEL}, {}, 400, "prompt"),
    ("/v1/completions", {"prompt": 42}, {}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, {}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, {}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, {}, 400, "stream"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, {}, 400, "max_tokens"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": -3},
        {},
        400,
        "max_tokens",
    ),
    ("/v1/completions", {"prompt": "x", "n": 0}, {}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "n": 1000}, {}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "temperature": 5}, {}, 400, "temperature"),
    ("/v1/completions", {"prompt": "the cat " * 400}, {}, 400, "prompt"),
    ("/v1/completions", {"prompt": list(range(1, 500)), "max_tokens": 100}, {}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": [1, 2, 99999]}, {}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": 0.5}, {}, 400, "frequency_penalty"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"five": 1.0}}, {}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, {}, 400, "suffix"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, {}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "frobnicate": 1}, {}, 400, "frobnicate"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
        {},
        400,
        "top_logprobs",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
        {},
        400,
        "tools",
    ),
    ("/v1/completions", {"prompt": "x", "dp_rank": 7}, {}, 400, "dp_rank"),
    (
        "/v1/completions",
        {"prompt": "x"},
        {"X-Data-Parallel-Rank": "left"},
        400,
        "X-Data-Parallel-Rank",
    ),
    (
        "/generate",
        {"text": "x", "sampling_params": {"max_new_tokens": -1}},
        {},
        400,
        "sampling_params",
    ),
    ("/generate", {"text": "x", "input_ids": [1]}, {}, 400, "text"),
]


def test_bad_inputs_get_openai_errors_and_server_keeps_serving(
    server: ServerThread, client: openai.OpenAI
) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for path, body, headers, status, param in BAD_INPUTS:
            kw = {"content": body} if isinstance(body, bytes) else {"json": body}
            r = http.post(path, headers=headers, **kw)
            assert r.status_code == status, (path, body, r.text)
            err = r.json()["error"]
            assert err["message"] and err["type"] == "invalid_request_error", err
            assert err["param"] == param, (body, err)
        r = http.get("/v1/nope")
        assert r.status_code == 404 and r.json()["error"]["message"]
        assert http.get("/health").status_code == 200
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    tok = server.state.tokenizer
    template, tok.chat_template = tok.chat_template, None
    try:  # the template is chosen at start-up: an app over a tokenizer without one has no chat
        plain = TestClient(create_app(server.state.engine))
    finally:
        tok.chat_template = template
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
    r = plain.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"], r.text
    out = client.completions.create(model=MODEL, prompt="still here?", max_tokens=4)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 4


def test_queue_full_is_429_and_accepted_requests_complete(
    server: ServerThread, client: openai.OpenAI
) -> None:
    saved, server.state.max_in_flight = server.state.max_in_flight, 2
    try:
        kw: dict[str, Any] = dict(
            model=MODEL, max_tokens=40, stream=True, extra_body={"ignore_eos": True}
        )
        streams = [
            client.completions.create(prompt=p, stream_options={"include_usage": True}, **kw)
            for p in ("first", "second")
        ]
        with pytest.raises(openai.RateLimitError, match="capacity"):
            client.completions.create(model=MODEL, prompt="third", max_tokens=4)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
        for s in streams:  # nothing already accepted is lost
            _, reasons, usage = _stream_texts(s)
            assert reasons == {0: "length"} and usage.completion_tokens == 40
    finally:
        server.state.max_in_flight = saved
    assert _m(_metrics(server.url), "dpattn_requests_rejected_total", reason="queue_full") >= 2


def test_metrics_per_rank_idle_batches_and_dp_cooperation(
    server: ServerThread, client: openai.OpenAI
) -> None:
    before = _metrics(server.url)
    for d in (0, 1):
        for name in (
            "dpattn_num_requests_running",
            "dpattn_num_requests_queued",
            "dpattn_kv_cache_usage_ratio",
            "dpattn_idle_batches_total",
            "dpattn_prompt_tokens_total",
            "dpattn_generation_tokens_total",
            "dpattn_mlp_padded_tokens_total",
            "dpattn_mlp_real_tokens_total",
            "dpattn_mlp_sync_seconds_count",
            "dpattn_time_to_first_token_seconds_count",
            "dpattn_inter_token_latency_seconds_count",
            "dpattn_dp_extending_groups_count",
        ):
            _m(before, name, **_rank(d))
        for mode in ("extend", "decode", "mixed", "idle"):
            _m(before, "dpattn_forward_steps_total", **_rank(d, mode=mode))
    for i in range(3):  # only DP group 0 has work: group 1 runs idle batches for the MLP
        client.completions.create(
            model=MODEL,
            prompt=f"pinned {i}",
            max_tokens=8,
            extra_headers={"X-Data-Parallel-Rank": "0"},
        )
    after = _metrics(server.url)

    def grew(name: str, d: int, **extra: str) -> float:
        return _m(after, name, **_rank(d, **extra)) - _m(before, name, **_rank(d, **extra))

    def idle_group_caught_up() -> bool:  # group 1 reports each step on its own, maybe later
        nonlocal after
        after = _metrics(server.url)
        return grew("dpattn_dp_extending_groups_count", 1) >= 3 * 8

    assert _wait_for(idle_group_caught_up, 30)  # generous: a loaded machine lags
    assert grew("dpattn_idle_batches_total", 1) >= 3 * 8
    assert grew("dpattn_idle_batches_total", 0) == 0
    assert grew("dpattn_generation_tokens_total", 0) == 24
    assert grew("dpattn_generation_tokens_total", 1) == 0
    assert grew("dpattn_forward_steps_total", 0, mode="decode") >= 3 * 7
    assert grew("dpattn_time_to_first_token_seconds_count", 0) == 3
    # DP cooperation: every step records how many groups were extending (here: 0 or 1)
    steps = grew("dpattn_dp_extending_groups_count", 1)
    assert steps >= 3 * 8 and grew("dpattn_dp_extending_groups_sum", 1) == 3
    assert _m(after, "dpattn_dp_extending_groups_bucket", **_rank(1, le="2.0")) > 0
    padded = _m(after, "dpattn_mlp_padded_tokens_total", **_rank(0))
    assert padded >= _m(after, "dpattn_mlp_real_tokens_total", **_rank(0)) > 0
    assert _m(after, "dpattn_mlp_sync_seconds_sum", **_rank(0)) > 0
    padding_steps = [
        v
        for (name, labels), v in after.items()
        if name == "dpattn_dp_padding_mode_steps_total" and ("dp_rank", "1") in labels
    ]
    assert sum(padding_steps) >= steps
