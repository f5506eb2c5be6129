"""Chat tools over HTTP (issue 28), through the official `openai` client on a tiny random model:
tool_choice "required" / a named function return `tool_calls` whose arguments validate against
the tool's schema, streamed as the client accumulates them; "auto" parses the calls the model
writes; a history with calls and results renders; bad tools are 400s naming the parameter.
The units (validation, parsing, the prompt): test_tool_calls.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from server_harness import MODEL, ServerThread, serving
from test_tool_calls import ADD_ONLY, NAMES, SCHEMAS, TOOLS, USER, Move

from dpattn.entrypoints.engine import Engine
from dpattn.models.tiny import make_tiny_model


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """conftest's server (tp=2 dp=2) over a tiny model with room for the tools' instruction:
    the tiny tokenizer spends about a token per character of it."""
    path: Path = make_tiny_model(
        "llama", tmp_path_factory.mktemp("tools") / "llama", max_position_embeddings=2048
    )
    with serving(Engine(str(path), 2, 2, backend="thread"), model_name=MODEL) as srv:
        yield srv


# ---- over HTTP ----
def _check_calls(calls: Any, names: set[str] = NAMES) -> None:
    assert calls
    for call in calls:
        assert (
            call.type == "function" and call.id.startswith("call_") and call.function.name in names
        )
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_and_named_tool_calls(client: openai.OpenAI) -> None:
    # a random model adds calls to the array as often as it closes it: room for a few
    kw: dict[str, Any] = dict(model=MODEL, messages=USER, tools=TOOLS, max_tokens=1024)
    for seed in range(3):
        out = client.chat.completions.create(**kw, tool_choice="required", seed=seed)
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        _check_calls(choice.message.tool_calls)
    one = client.chat.completions.create(
        **kw, tool_choice="required", parallel_tool_calls=False, seed=3
    )
    assert len(one.choices[0].message.tool_calls or []) == 1
    named = client.chat.completions.create(**kw, tool_choice=ADD_ONLY, n=2, seed=4)
    for choice in named.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        _check_calls(choice.message.tool_calls, {"add"})


@pytest.mark.parametrize("choice", ["required", ADD_ONLY])
def test_tool_calls_stream_as_the_client_accumulates_them(
    client: openai.OpenAI, choice: Any
) -> None:
    kw: dict[str, Any] = dict(model=MODEL, messages=USER, tools=TOOLS, max_tokens=1024, seed=9)
    full = client.chat.completions.create(**kw, tool_choice=choice)
    with client.chat.completions.stream(**kw, tool_choice=choice) as stream:
        final = stream.get_final_completion()
    got, want = final.choices[0], full.choices[0]
    assert got.finish_reason == want.finish_reason == "tool_calls"
    _check_calls(got.message.tool_calls)
    assert [(c.function.name, c.function.arguments) for c in got.message.tool_calls or []] == [
        (c.function.name, c.function.arguments) for c in want.message.tool_calls or []
    ]


def test_parse_with_a_pydantic_tool(client: openai.OpenAI) -> None:
    out = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Go."}],
        tools=[openai.pydantic_function_tool(Move)],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=1024,
        seed=0,
    )
    calls = out.choices[0].message.tool_calls or []
    assert len(calls) == 1 and all(isinstance(c.function.parsed_arguments, Move) for c in calls)


def test_auto_parses_calls_the_model_writes(client: openai.OpenAI) -> None:
    # The tiny model never writes a call by itself: a regex makes it write text and one call.
    regex = r'Sure\. <tool_call>\n\{"name": "add", "arguments": \{"a": [0-9], "b": [0-9]\}\}\n</tool_call>'
    kw: dict[str, Any] = dict(model=MODEL, messages=USER, tools=TOOLS, max_tokens=200, seed=1)
    out = client.chat.completions.create(**kw, extra_body={"regex": regex})
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Sure."
    _check_calls(choice.message.tool_calls, {"add"})
    with client.chat.completions.stream(**kw, extra_body={"regex": regex}) as stream:
        final = stream.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls" and (final.message.content or "").strip() == "Sure."
    _check_calls(final.message.tool_calls, {"add"})
    plain = client.chat.completions.create(**kw)  # garbage text, no call: content
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].message.content


def test_history_with_tool_calls_and_results(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model=MODEL, messages=USER, tools=TOOLS, tool_choice=ADD_ONLY, max_tokens=256, seed=2
    )
    call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    history = [
        *USER,
        first.choices[0].message,  # the client sends back what it got, content null
        {"role": "tool", "tool_call_id": call.id, "content": "42"},
    ]
    out = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=8)
    assert out.choices[0].finish_reason in ("length", "stop", "tool_calls")


BAD_BODIES: list[tuple[dict[str, Any], str]] = [
    ({"tools": {"name": "f"}}, "tools"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"tools": TOOLS + TOOLS}, "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tools"),
    ({"tools": TOOLS, "tool_choice": ADD_ONLY, "regex": "a+"}, "tools"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ({"messages": [{"role": "assistant", "content": None}]}, "messages.0.content"),
    (
        {"messages": [{"role": "user", "content": "x", "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
        "messages.0.tool_calls",
    ),
    ({"messages": [{"role": "user", "content": "x", "tool_call_id": "1"}]}, "messages.0.tool_call_id"),
]  # fmt: skip


def test_bad_tool_requests_over_http(server: ServerThread) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for extra, param in BAD_BODIES:
            body = {"model": MODEL, "messages": USER, "max_tokens": 4, **extra}
            r = http.post("/v1/chat/completions", json=body)
            assert r.status_code == 400, (extra, r.text)
            err = r.json()["error"]
            assert err["param"] == param and err["type"] == "invalid_request_error", (extra, err)
