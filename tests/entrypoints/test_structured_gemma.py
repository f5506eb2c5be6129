"""Structured outputs on the real default model (issue 28's acceptance run), opt-in with
DPATTN_REAL_MODEL_TESTS=1: `dpattn serve --tp 2 --dp 2` on Gemma 3 270M (gloo processes, the
real CLI), queried with the official `openai` client at temperature 1.

A 270M base model almost never writes valid JSON on its own; under the grammar every output must
parse and validate. Strings and arrays carry bounds (as extraction schemas do): a base model at
temperature 1 can ramble inside an unbounded string until max_tokens, which no grammar forbids.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from typing import Annotated, Any

import jsonschema
import openai
import pytest
from proc_harness import free_port, wait_healthy
from pydantic import BaseModel, Field

from dpattn.models.gguf_convert import converted_dir, is_converted, package_installed

pytestmark = pytest.mark.skipif(
    os.environ.get("DPATTN_REAL_MODEL_TESTS") != "1"
    or not (package_installed() and is_converted(converted_dir())),
    reason="opt-in (DPATTN_REAL_MODEL_TESTS=1) and needs the converted Gemma 3 270M",
)

SAMPLES = 50
Short = Field(max_length=24)


class Color(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Address(BaseModel):
    city: str = Short
    zip_code: int = Field(ge=10000, le=99999)


class Person(BaseModel):
    name: str = Short
    age: int = Field(ge=0, le=120)
    height_m: float = Field(ge=0.5, le=2.5)
    favourite: Color
    address: Address
    nickname: str | None = Field(default=None, max_length=16)


class Item(BaseModel):
    sku: str = Field(pattern=r"^[A-Z]{3}-\d{4}$")
    quantity: int = Field(ge=1, le=99)
    price: float = Field(ge=0, le=1000)


class Order(BaseModel):
    order_id: int = Field(ge=1)
    items: list[Item] = Field(min_length=1, max_length=4)
    express: bool
    notes: list[Annotated[str, Short]] = Field(default_factory=list, max_length=3)


class Weather(BaseModel):
    city: str = Short
    celsius: float = Field(ge=-60, le=60)
    conditions: list[Color] = Field(min_length=1, max_length=3)


MODELS: list[tuple[type[BaseModel], str]] = [
    (Person, "Describe a fictional person."),
    (Order, "Write a shop order."),
    (Weather, "Report today's weather."),
]


@pytest.fixture(scope="module")
def client() -> Iterator[openai.OpenAI]:
    port = free_port()
    cmd = [sys.executable, "-m", "dpattn.cli", "serve", "--tp", "2", "--dp", "2"]
    cmd += ["--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, timeout=300)
        yield openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _chat(client: openai.OpenAI, prompt: str, **kwargs: Any) -> Any:
    return client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": prompt}],
        **kwargs,
    )


def test_parse_pydantic_models(client: openai.OpenAI) -> None:
    def one(i: int) -> Any:
        model, prompt = MODELS[i % len(MODELS)]
        try:
            out = client.chat.completions.parse(
                model=client.models.list().data[0].id,
                messages=[{"role": "user", "content": prompt + " Answer in JSON."}],
                response_format=model,
                temperature=1.0,
                max_tokens=400,
                seed=i,
            )
        except openai.LengthFinishReasonError as e:  # cut by max_tokens: report its text
            text = e.completion.choices[0].message.content
            raise AssertionError(f"{model.__name__} cut by max_tokens: {text}") from None
        return model, out.choices[0]

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(SAMPLES)))
    bad = [(m.__name__, c.message.content) for m, c in results if c.message.parsed is None]
    assert not bad, bad
    for model, choice in results:
        assert isinstance(choice.message.parsed, model)
        assert choice.finish_reason == "stop"
    print(f"\n{SAMPLES}/{SAMPLES} parsed; e.g. {results[0][1].message.content}")


def test_json_object_regex_and_ebnf(client: openai.OpenAI) -> None:
    for seed in range(4):
        out = _chat(
            client,
            "Give me a JSON object about cats.",
            response_format={"type": "json_object"},
            temperature=1.0,
            max_tokens=400,
            seed=seed,
        )
        # an object at any depth of nesting: a base model may not close it before max_tokens,
        # so only complete outputs (finish "stop") are required to parse
        if out.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(out.choices[0].message.content), dict)
    date = r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
    phone = r"\+1 \(\d{3}\) \d{3}-\d{4}"
    for pattern in (date, phone):
        for seed in range(4):
            out = _chat(
                client,
                "Write one.",
                temperature=1.0,
                max_tokens=40,
                seed=seed,
                extra_body={"regex": pattern},
            )
            assert re.fullmatch(pattern, out.choices[0].message.content), out
    grammar = 'root ::= answer " because " reason\nanswer ::= "yes" | "no"\nreason ::= [a-z ]{1,40}'
    for seed in range(4):
        out = _chat(
            client,
            "Is the sky blue?",
            temperature=1.0,
            max_tokens=60,
            seed=seed,
            extra_body={"ebnf": grammar},
        )
        assert re.fullmatch(r"(yes|no) because [a-z ]{1,40}", out.choices[0].message.content)


def test_tool_call_required(client: openai.OpenAI) -> None:
    params = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 24},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "unit"],
        "additionalProperties": False,
    }
    tools = [
        {
            "type": "function",
            "function": {"name": "get_weather", "description": "Weather", "parameters": params},
        }
    ]
    for seed in range(6):
        out = _chat(
            client,
            "What is the weather in Paris?",
            tools=tools,
            tool_choice="required",
            # one call: with parallel calls allowed a base model lists calls until max_tokens
            parallel_tool_calls=False,
            temperature=1.0,
            max_tokens=200,
            seed=seed,
        )
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls"
        call = choice.message.tool_calls[0]
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), params)
