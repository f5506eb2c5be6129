"""Chat tools (issue 28), the frontend's units: `tools` / `tool_choice` validated (400s naming
the parameter), the constraint they imply, the prompt they render, and the model's output
parsed into `tool_calls` (Hermes / Qwen `<tool_call>` blocks for "auto", the constrained JSON
for "required" and a named function), whole or as stream deltas. Over HTTP:
test_tool_calls_api.py."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest
import xgrammar
from pydantic import BaseModel, Field

from dpattn.entrypoints.chat_template import BUILTIN, ChatTemplate
from dpattn.entrypoints.errors import ApiError
from dpattn.entrypoints.tool_calls import parse_hermes, parse_required, required_schema, tool_plan
from dpattn.entrypoints.tool_prompt import prompt_messages
from dpattn.entrypoints.tool_stream import ChoiceOutput
from dpattn.models.tiny import make_tokenizer

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 99},
        "b": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["a", "b"],
    "additionalProperties": False,
}
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
TOOLS = [
    {"type": "function", "function": {"name": n, "description": f"{n}.", "parameters": s}}
    for n, s in SCHEMAS.items()
]
NAMES = set(SCHEMAS)
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
ADD_CALL = '{"name": "add", "arguments": {"a": 1, "b": 2}}'
ADD_ONLY = {"type": "function", "function": {"name": "add"}}


class Street(BaseModel):
    name: str = Field(max_length=8)
    number: int = Field(ge=1, le=99)


class Move(BaseModel):
    """Move to a street."""

    street: Street
    fast: bool


# ---- units: tools and tool_choice ----
BAD_TOOLS: list[tuple[Any, Any, str]] = [
    ([{"type": "function"}], None, "tools"),
    ([{"type": "code_interpreter"}], None, "tools"),
    ([{"type": "function", "function": {"name": "a b"}}], None, "tools"),
    ([{"type": "function", "function": {"name": "x" * 65}}], None, "tools"),
    ([{"type": "function", "function": {"name": "f", "params": {}}}], None, "tools"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}], None, "tools"),
    ([{"type": "function", "function": {"name": "f", "parameters": [1]}}], None, "tools"),
    (TOOLS + TOOLS[:1], None, "tools"),  # a name twice
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
    (TOOLS, {"type": "function"}, "tool_choice"),
    (TOOLS, "sometimes", "tool_choice"),
    (None, "required", "tool_choice"),
    (None, ADD_ONLY, "tool_choice"),
]  # fmt: skip


@pytest.mark.parametrize("tools, choice, param", BAD_TOOLS)
def test_bad_tools_are_400s_naming_the_parameter(tools: Any, choice: Any, param: str) -> None:
    with pytest.raises(ApiError) as e:
        tool_plan(tools, choice, None)
    assert e.value.status == 400 and e.value.param == param, e.value.message


def test_tool_choice_modes_and_constraints() -> None:
    assert tool_plan(None, None, None).mode == "none"
    assert tool_plan(TOOLS, None, None).mode == "auto"
    assert tool_plan(TOOLS, "none", None).constraint() is None
    assert tool_plan(TOOLS, "auto", None).constraint() is None
    named = tool_plan(TOOLS, ADD_ONLY, None)
    assert named.mode == "named" and named.named is not None and named.named.name == "add"
    got = named.constraint()
    assert got is not None and got.param == "tools" and json.loads(got.text) == ADD
    plain = tool_plan([{"type": "function", "function": {"name": "ping"}}], "required", None)
    assert plain.tools[0].parameters == {"type": "object", "properties": {}}
    required = tool_plan(TOOLS, "required", False).constraint()
    assert required is not None and json.loads(required.text)["maxItems"] == 1


def test_required_schema_accepts_calls_of_the_tools_only() -> None:
    tools = tool_plan(
        [*TOOLS, openai.pydantic_function_tool(Move)], "required", None
    ).tools  # Move's parameters refer to Street through $defs
    schema = required_schema(list(tools), parallel=True)
    jsonschema.Draft202012Validator.check_schema(schema)
    xgrammar.Grammar.from_json_schema(json.dumps(schema))  # the backend compiles it
    move = {"street": {"name": "Main", "number": 3}, "fast": True}
    good = [{"name": "add", "parameters": {"a": 1, "b": 2}}, {"name": "Move", "parameters": move}]
    jsonschema.validate(good, schema)
    for bad in [
        [],
        [{"name": "sub", "parameters": {"a": 1, "b": 2}}],
        [{"name": "add", "parameters": {"a": 1}}],
        [{"name": "Move", "parameters": {**move, "street": {"name": "x"}}}],
    ]:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    assert required_schema(list(tools), parallel=False)["maxItems"] == 1


# ---- units: parsing the output ----
def test_parse_hermes_calls() -> None:
    content, calls = parse_hermes(f"<tool_call>\n{ADD_CALL}\n</tool_call>", NAMES)
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("add", {"a": 1, "b": 2})
    ]
    weather = '{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}'  # args as text
    text = f"Let me see.\n<tool_call>\n{ADD_CALL}\n</tool_call>\n<tool_call>{weather}</tool_call>"
    content, calls = parse_hermes(text, NAMES)
    assert content == "Let me see." and [c.name for c in calls] == ["add", "get_weather"]
    assert json.loads(calls[1].arguments) == {"city": "Oslo"} and calls[0].id != calls[1].id
    assert all(c.id.startswith("call_") for c in calls)
    content, calls = parse_hermes(f"<tool_call>\n{ADD_CALL}", NAMES)  # never closed
    assert content is None and len(calls) == 1


@pytest.mark.parametrize(
    "text",
    [
        "no calls here",
        "<tool_call>\n{not json}\n</tool_call>",
        '<tool_call>\n{"name": "sub", "arguments": {}}\n</tool_call>',  # not a tool
        '<tool_call>\n{"name": "add", "arguments": [1, 2]}\n</tool_call>',
        '<tool_call>\n["add"]\n</tool_call>',
    ],
)
def test_malformed_calls_stay_content(text: str) -> None:
    assert parse_hermes(text, NAMES) == (text, [])


def test_one_good_call_among_malformed_ones() -> None:
    bad = "<tool_call>{oops}</tool_call>"
    content, calls = parse_hermes(f"{bad}\n<tool_call>{ADD_CALL}</tool_call>", NAMES)
    assert content == bad and [c.name for c in calls] == ["add"]


def test_parse_required() -> None:
    calls = parse_required('[{"name": "add", "parameters": {"a": 1, "b": 2}}]', NAMES)
    assert calls is not None and json.loads(calls[0].arguments) == {"a": 1, "b": 2}
    assert parse_required('[{"name": "add", "parameters": {"a": 1', NAMES) is None  # cut
    assert parse_required("[]", NAMES) is None


def _streamed(out: ChoiceOutput, pieces: list[str], finish: str) -> tuple[list[Any], str | None]:
    deltas = [out.first()]
    for p in pieces:
        deltas += out.feed(p)
    more, reason = out.end(finish)
    return deltas + more, reason


def test_auto_stream_holds_back_calls_only() -> None:
    pieces = ["Hel", "lo <tool", "_call>\n{", ADD_CALL[1:], "\n</tool_call>"]
    deltas, reason = _streamed(ChoiceOutput(tool_plan(TOOLS, None, None)), pieces, "stop")
    content = "".join(d.get("content") or "" for d in deltas)
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert content == "Hello " and reason == "tool_calls"
    assert [(c["index"], c["function"]["name"]) for c in calls] == [(0, "add")]
    deltas, reason = _streamed(ChoiceOutput(tool_plan(TOOLS, None, None)), ["a <", "b"], "length")
    assert "".join(d.get("content") or "" for d in deltas) == "a <b" and reason == "length"


def test_named_and_required_streams() -> None:
    out = ChoiceOutput(tool_plan(TOOLS, ADD_ONLY, None))
    deltas, reason = _streamed(out, ['{"a": 1', ', "b": 2}'], "stop")
    head = deltas[0]["tool_calls"][0]
    assert head["function"] == {"name": "add", "arguments": ""} and head["id"].startswith("call_")
    args = "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas)
    assert json.loads(args) == {"a": 1, "b": 2} and reason == "tool_calls"
    out = ChoiceOutput(tool_plan(TOOLS, "required", None))
    deltas, reason = _streamed(
        out, ['[{"name": "add", ', '"parameters": {"a": 1, "b": 2}}]'], "stop"
    )
    assert reason == "tool_calls" and deltas[-1]["tool_calls"][0]["function"]["name"] == "add"
    message, reason = out.message('[{"name": "add", "parameters": {"a": 1', "length")
    assert reason == "length" and message["content"] and "tool_calls" not in message


# ---- units: the prompt ----
HISTORY = [
    *USER,
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": {"a": 1}}}
        ],
    },
    {"role": "tool", "content": "3", "tool_call_id": "call_1"},
    {"role": "tool", "content": "4", "tool_call_id": "call_2"},
]
TOOL_TEMPLATE = (  # the shape of HF templates with tool support (Qwen's, simplified)
    "{%- if tools %}<|im_start|>system\n{% for t in tools %}{{ t.function.name }};{% endfor %}"
    "<|im_end|>\n{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{%- for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}"
    "<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
)


def test_prompt_for_templates_with_and_without_tool_support() -> None:
    tok = make_tokenizer()
    plan = tool_plan(TOOLS, None, None)
    native = ChatTemplate("x", TOOL_TEMPLATE)
    messages, tools = prompt_messages(HISTORY, plan, native.knows_tools)
    text = native.render(tok, messages, tools=tools)
    # the history's arguments reach the template as an object (not a JSON string in a string)
    assert "get_weather;add;" in text and '"arguments": {"a": 1}' in text
    plain = ChatTemplate("tiny", tok.chat_template)
    assert not plain.knows_tools
    messages, tools = prompt_messages(HISTORY, plan, plain.knows_tools)
    assert (
        tools is None
        and messages[0]["role"] == "system"
        and "get_weather" in messages[0]["content"]
    )
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert (
        "<tool_call>" in messages[2]["content"]
        and messages[3]["content"].count("<tool_response>") == 2
    )
    assert "<tool_call>" in plain.render(tok, messages)
    gemma = ChatTemplate("gemma", *BUILTIN["gemma"])  # no tool support, roles must alternate
    messages, _ = prompt_messages([*HISTORY, {"role": "user", "content": "And?"}], plan, False)
    text = gemma.render(tok, messages)  # raises where roles do not alternate
    assert text.count("<start_of_turn>user") == 2 and "You can call these functions" in text
    assert "</tool_response>\nAnd?" in text  # the results and the next question: one turn
    messages, tools = prompt_messages(USER, tool_plan(TOOLS, "none", None), False)
    assert messages == USER and tools is None  # "none": the tools are not shown
