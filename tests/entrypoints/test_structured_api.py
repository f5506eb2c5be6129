"""Structured outputs over HTTP (issue 28): response_format (text, json_object, json_schema),
SGLang's regex / ebnf / json_schema on chat, completions and /generate's sampling_params.

Each invalid constraint, and a grammar the ranks fail to compile, is a 400 naming its parameter;
the tiny random model, whose text is garbage, must still answer valid JSON / a matching string
under each constraint, through the official `openai` client, streamed or not. Schemas bound
their strings (maxLength) and numbers so that random text ends well within max_tokens."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from grammar_faults import fail_compiles
from server_harness import MODEL, ServerThread, _m, _metrics, _rank, _wait_for
from test_structured import DATE, EBNF, SCHEMA, USER, City, chat_body

from dpattn.models.tiny import make_tokenizer

# ---- over HTTP: each invalid constraint is a 400 naming its parameter ----
BAD_SCHEMA = {"type": "object", "properties": {"a": {"type": "strng"}}}
BAD_REQUESTS: list[tuple[str, dict[str, Any], str]] = [
    (
        "/v1/chat/completions",
        chat_body(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": BAD_SCHEMA}}),
        "response_format",
    ),
    ("/v1/chat/completions", chat_body(response_format={"type": "yaml"}), "response_format"),
    ("/v1/chat/completions", chat_body(regex="[a-"), "regex"),
    ("/v1/chat/completions", chat_body(ebnf="root ::= missing_rule"), "ebnf"),
    ("/v1/chat/completions", chat_body(regex=DATE, ebnf=EBNF), "ebnf"),
    (
        "/v1/chat/completions",
        chat_body(response_format={"type": "json_object"}, regex=DATE),
        "regex",
    ),
    ("/v1/completions", {"prompt": "x", "json_schema": json.dumps(BAD_SCHEMA)}, "json_schema"),
    ("/v1/completions", {"prompt": "x", "json_schema": "{"}, "json_schema"),
    ("/v1/completions", {"prompt": "x", "regex": "(a"}, "regex"),
    ("/v1/completions", {"prompt": "x", "ebnf": "root ::= "}, "ebnf"),
    (
        "/v1/completions",
        {"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        "response_format",
    ),
    ("/v1/completions", {"prompt": "x", "regex": DATE, "json_schema": "{}"}, "json_schema"),
    ("/generate", {"text": "x", "sampling_params": {"regex": "[a-"}}, "sampling_params.regex"),
    ("/generate", {"text": "x", "sampling_params": {"ebnf": "x ::= "}}, "sampling_params.ebnf"),
    (
        "/generate",
        {"text": "x", "sampling_params": {"json_schema": json.dumps(BAD_SCHEMA)}},
        "sampling_params.json_schema",
    ),
]  # fmt: skip


def test_invalid_constraints_are_400s_naming_the_parameter(server: ServerThread) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for path, body, param in BAD_REQUESTS:
            r = http.post(path, json=body)
            assert r.status_code == 400, (path, body, r.text)
            err = r.json()["error"]
            assert err["type"] == "invalid_request_error" and err["param"] == param, (body, err)
            assert err["message"]
        assert http.get("/health").status_code == 200


@pytest.fixture
def boom(monkeypatch: pytest.MonkeyPatch) -> str:
    """Every rank fails to compile a grammar whose text holds "boom"; what the rank says."""
    return fail_compiles(monkeypatch)


def test_a_grammar_the_ranks_cannot_compile_is_a_400(server: ServerThread, boom: str) -> None:
    schema = {"type": "object", "properties": {"boom": {"type": "boolean"}}, "required": ["boom"]}
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    cases = [
        ("/v1/chat/completions", chat_body(response_format=rf, max_tokens=4), "response_format"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 4, "regex": "boom|bang"}, "regex"),
        (
            "/generate",
            {"text": "x", "sampling_params": {"max_new_tokens": 4, "ebnf": 'root ::= "boom"'}},
            "sampling_params.ebnf",
        ),
    ]
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for path, body, param in cases:
            for stream in (False, True):  # the second: from the backend's failure cache
                if not stream:
                    r = http.post(path, json=body)
                    assert r.status_code == 400, (path, r.text)
                    err = r.json()["error"]
                    assert err["param"] == param, err
                else:
                    with http.stream("POST", path, json={**body, "stream": True}) as s:
                        events = [x[6:] for x in s.iter_lines() if x.startswith("data: {")]
                    err = json.loads(events[-1])["error"]
                assert err["type"] == "invalid_request_error" and boom in err["message"], err
        assert http.get("/health").status_code == 200
        ok = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 32, "regex": DATE})
        assert ok.status_code == 200 and re.fullmatch(DATE, ok.json()["choices"][0]["text"])


# ---- over HTTP: every output holds under its constraint (tiny random model) ----
# Seeded throughout: xgrammar 0.2.9 admits overlong UTF-8 (e.g. e0 95 b0), which decodes to
# three U+FFFD; a random model drawing byte tokens writes one in ~1 of 200 bounded strings.
def test_parse_returns_pydantic_objects(server: ServerThread, client: openai.OpenAI) -> None:
    def constrained() -> float:
        return sum(
            _m(_metrics(server.url), "dpattn_constrained_rows_total", **_rank(d)) for d in (0, 1)
        )

    before, tokens = constrained(), 0
    for seed in range(4):
        out = client.chat.completions.parse(
            model=MODEL, messages=USER, response_format=City, max_tokens=256, seed=seed
        )
        choice = out.choices[0]
        assert choice.finish_reason == "stop", choice
        assert isinstance(choice.message.parsed, City), choice.message.content
        City.model_validate_json(choice.message.content or "")
        tokens += out.usage.completion_tokens
    # every token of theirs was sampled under a mask, and /metrics counts them
    assert _wait_for(lambda: constrained() - before == tokens)


def test_json_schema_stream_and_n(client: openai.OpenAI) -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}
    kw: dict[str, Any] = dict(model=MODEL, messages=USER, max_tokens=256, response_format=rf)
    full = client.chat.completions.create(**kw, n=2, seed=5)
    for c in full.choices:
        jsonschema.validate(json.loads(c.message.content or ""), SCHEMA)
        assert c.finish_reason == "stop"
    stream = client.chat.completions.create(**kw, seed=5, stream=True)
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert text == full.choices[0].message.content  # same seed, same constrained draw


def test_json_object(client: openai.OpenAI) -> None:
    # Any object holds; a random model's keys run long, so "}" is favoured: "{}" is the answer.
    brace = _token_id("}")
    out = client.chat.completions.create(
        model=MODEL,
        messages=USER,
        max_tokens=64,
        response_format={"type": "json_object"},
        logit_bias={str(brace): 100},
        seed=0,
    )
    assert isinstance(json.loads(out.choices[0].message.content or ""), dict)
    comp = client.completions.create(
        model=MODEL,
        prompt="JSON:",
        max_tokens=64,
        logit_bias={str(brace): 100},
        extra_body={"response_format": {"type": "json_object"}},
        seed=0,
    )
    assert isinstance(json.loads(comp.choices[0].text), dict)


def _token_id(text: str) -> int:
    ids = make_tokenizer().encode(text, add_special_tokens=False)
    assert len(ids) == 1, ids
    return ids[0]


def test_regex_and_ebnf_hold(client: openai.OpenAI) -> None:
    for seed in range(3):
        chat = client.chat.completions.create(
            model=MODEL, messages=USER, max_tokens=32, seed=seed, extra_body={"regex": DATE}
        )
        assert re.fullmatch(DATE, chat.choices[0].message.content or ""), chat
        comp = client.completions.create(
            model=MODEL, prompt="Today:", max_tokens=32, seed=seed, extra_body={"ebnf": EBNF}
        )
        assert re.fullmatch(r"yes|no|maybe [0-9]", comp.choices[0].text), comp
        assert comp.choices[0].finish_reason == "stop"
    stream = client.completions.create(
        model=MODEL, prompt="Today:", max_tokens=32, stream=True, seed=0, extra_body={"regex": DATE}
    )
    assert re.fullmatch(DATE, "".join(c.choices[0].text for c in stream if c.choices))
    schema = json.dumps(SCHEMA)
    comp = client.completions.create(
        model=MODEL, prompt="{", max_tokens=256, seed=0, extra_body={"json_schema": schema}
    )
    jsonschema.validate(json.loads(comp.choices[0].text), SCHEMA)


def test_generate_sampling_params_constrain(server: ServerThread) -> None:
    sp = {"max_new_tokens": 256, "json_schema": json.dumps(SCHEMA), "n": 2, "sampling_seed": 0}
    r = httpx.post(
        server.url + "/generate", json={"text": "City:", "sampling_params": sp}, timeout=60
    )
    assert r.status_code == 200, r.text
    for out in r.json():
        jsonschema.validate(json.loads(out["text"]), SCHEMA)
        assert out["meta_info"]["finish_reason"]["type"] == "stop"
    body = {"text": "Date:", "sampling_params": {"max_new_tokens": 32, "regex": DATE, "seed": 0}}
    with httpx.stream("POST", server.url + "/generate", json={**body, "stream": True}) as s:
        events = [json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: {")]
    assert re.fullmatch(DATE, events[-1]["text"])
