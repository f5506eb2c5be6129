"""Structured outputs (issue 28), the frontend's units: response_format, SGLang's regex / ebnf /
json_schema and /generate's sampling_params mapped onto SamplingParams' grammar fields, each
mistake a 400 naming its parameter; the schema text the grammar backend is given; a rank's
grammar abort carried to the frontend with its status. Over HTTP: test_structured_api.py."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

import pytest
from pydantic import BaseModel, Field
from server_harness import MODEL

from dpattn.entrypoints.errors import ApiError
from dpattn.entrypoints.openai_protocol import ChatCompletionRequest, CompletionRequest
from dpattn.entrypoints.request_state import RequestState
from dpattn.entrypoints.sglang_fields import generate_sampling
from dpattn.entrypoints.structured import (
    JSON_OBJECT,
    Constraint,
    grammar_error_param,
    grammar_schema,
    request_constraint,
    response_format,
)
from dpattn.messages import RequestOutput

USER = [{"role": "user", "content": "Describe a city as JSON."}]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "size": {"enum": ["small", "big"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 999},
    },
    "required": ["name", "size", "age"],
    "additionalProperties": False,
}
DATE = r"\d{4}-\d{2}-\d{2}"
EBNF = 'root ::= "yes" | "no" | "maybe " [0-9]'


class Street(BaseModel):
    name: str = Field(max_length=10)
    number: int = Field(ge=1, le=500)


class City(BaseModel):  # nested objects, arrays, enums, optional fields, bounded numbers
    name: str = Field(max_length=12)
    kind: Literal["town", "city", "village"]
    population: int = Field(ge=0, le=100000)
    score: float = Field(ge=0, le=1)
    streets: list[Street] = Field(max_length=2)
    mayor: str | None = Field(max_length=6)


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": USER, "max_tokens": 256, "seed": 1, **extra}


# ---- units: the request -> SamplingParams mapping ----
@pytest.mark.parametrize(
    "rf, want",
    [
        (None, None),
        ({"type": "text"}, None),
        ({"type": "json_object"}, JSON_OBJECT),
        ({"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}, SCHEMA),
        (
            {
                "type": "json_schema",
                "json_schema": {
                    "name": "c-1",
                    "schema": SCHEMA,
                    "strict": True,
                    "description": "x",
                },
            },
            SCHEMA,
        ),
    ],
)
def test_response_format_maps_to_a_json_schema(rf: Any, want: Any) -> None:
    got = response_format(rf)
    if want is None:
        assert got is None
        return
    assert got is not None and got.kind == "json_schema" and got.param == "response_format"
    assert got.text == (want if isinstance(want, str) else grammar_schema(want))


BAD_FORMATS = [
    "json",
    {"kind": "json_object"},
    {"type": "xml"},
    {"type": "structural_tag"},
    {"type": "json_object", "schema": {}},
    {"type": "json_schema"},
    {"type": "json_schema", "json_schema": {"schema": SCHEMA}},  # no name
    {"type": "json_schema", "json_schema": {"name": "a b", "schema": SCHEMA}},
    {"type": "json_schema", "json_schema": {"name": "a"}},  # no schema
    {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": "yes"}},
    {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "extra": 1}},
    {"type": "json_schema", "json_schema": {"name": "a", "schema": [1]}},
    {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "nope"}}},
    {"type": "json_schema", "json_schema": {"name": "a", "schema": {"minLength": -1}}},
]


@pytest.mark.parametrize("rf", BAD_FORMATS)
def test_bad_response_format_is_a_400_naming_it(rf: Any) -> None:
    with pytest.raises(ApiError) as e:
        response_format(rf)
    assert e.value.status == 400 and e.value.param == "response_format", e.value.message


def test_request_constraint_sources_and_at_most_one() -> None:
    chat = ChatCompletionRequest.model_validate({"messages": USER, "regex": DATE})
    assert request_constraint(chat) == Constraint("regex", DATE, "regex")
    comp = CompletionRequest.model_validate({"prompt": "x", "json_schema": json.dumps(SCHEMA)})
    want = Constraint("json_schema", grammar_schema(SCHEMA), "json_schema")
    assert request_constraint(comp) == want
    text = {"type": "text"}
    both = ChatCompletionRequest.model_validate(
        {"messages": USER, "response_format": text, "ebnf": EBNF}
    )
    assert request_constraint(both) == Constraint("ebnf", EBNF, "ebnf")  # text constrains nothing
    for extra in [
        {"regex": DATE, "ebnf": EBNF},
        {"response_format": {"type": "json_object"}, "regex": DATE},
    ]:
        req = ChatCompletionRequest.model_validate({"messages": USER, **extra})
        with pytest.raises(ApiError, match="at most one") as e:
            request_constraint(req)
        assert e.value.param == list(extra)[1]
    tools = Constraint("json_schema", "{}", "tools")
    req = ChatCompletionRequest.model_validate({"messages": USER, "regex": DATE})
    with pytest.raises(ApiError) as e:
        request_constraint(req, tools)
    assert e.value.param == "tools"


def test_generate_sampling_params_grammar() -> None:
    got = generate_sampling({"regex": DATE, "max_new_tokens": 9})
    assert got.fields["regex"] == DATE and got.grammar_param == "sampling_params.regex"
    got = generate_sampling({"json_schema": json.dumps(SCHEMA)}, "sampling_params.1")
    assert got.grammar_param == "sampling_params.1.json_schema"
    assert generate_sampling({}).grammar_param is None
    for sp, param in [
        ({"json_schema": "{not json"}, "sampling_params.json_schema"),
        ({"json_schema": '{"type": 5}'}, "sampling_params.json_schema"),
        ({"regex": ""}, "sampling_params.regex"),
        ({"regex": DATE, "ebnf": EBNF}, "sampling_params.ebnf"),
        ({"structural_tag": "{}"}, "sampling_params.structural_tag"),
    ]:
        with pytest.raises(ApiError) as e:
            generate_sampling(sp)
        assert e.value.status == 400 and e.value.param == param, (sp, e.value.message)


def test_grammar_errors_name_their_parameter() -> None:
    assert grammar_error_param(ValueError("regex: Unclosed '['"), "regex") == "regex"
    assert grammar_error_param(ValueError("ebnf: bad"), "response_format") == "response_format"
    assert grammar_error_param(ValueError("top_p must be in (0, 1]"), "regex") is None
    assert grammar_error_param(ValueError("regex: x"), None) is None


def test_a_rank_side_grammar_abort_carries_its_status() -> None:
    state = RequestState(prompt_tokens=3, dp_rank=0)
    why = "json_schema: grammar compile timed out after 0.5 s"
    delta = state.absorb(RequestOutput("r", [], [], "abort", error=why, error_status=400))
    assert (delta.finish_reason, delta.error, delta.error_status) == ("abort", why, 400)
    assert dataclasses.replace(state.so_far("r")).error_status == 400  # a late listener too
    state.finish_reason = "abort"
    assert state.meta_info("r")["error"] == why
