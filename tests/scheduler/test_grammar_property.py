"""Property: every output generated under a random JSON schema parses and validates against it
and ends by the grammar (finish_reason "stop"), on (1,1), (2,2) and disaggregated (1,1) -> (2,2)
with the decode side continuing the grammar. The tiny random models sample at temperature 1,
so the masks alone make the JSON: nothing valid comes from the model by chance.

Drawn: objects (nested, with a random subset of their properties required), arrays with
minItems / maxItems, enums (strings with quotes, backslashes, control and non-ASCII characters,
numbers, booleans, null), integers and numbers with both bounds, booleans, nulls, strings with
maxLength (and minLength). Every size is bounded so that an output's worst case fits the tiny
model's context: a schema with unbounded strings, arrays or numbers would leave a random model
writing until max_new_tokens. Not drawn: `pattern`, which xgrammar 0.2.9 does not combine
with minLength / maxLength (it drops the bounds, with a warning), so a patterned string is
unbounded. Length-bounded strings are where xgrammar 0.2.9 let raw control characters through
(invalid JSON), which this test found; executor/grammar.py narrows the class. Each example is a
small batch of (schema, prompt) pairs, sometimes with an unconstrained request beside them (its
row must stay unmasked: it runs to max_new_tokens).

DPATTN_GRAMMAR_PROPERTY_EXAMPLES=N runs N random examples per layout (default: a fixed few,
~20 s in all). DPATTN_PD_FULL=1 also sends them over HTTP through the PD router to the two
engines' servers (/generate, SGLang's json_schema).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from proc_harness import Uvicorn, free_port

from dpattn.disaggregation.pd_router import PDRouter, PrefillServer, create_router_app
from dpattn.entrypoints.engine import Engine
from dpattn.entrypoints.http_server import create_app
from dpattn.executor.sampling_params import SamplingParams
from dpattn.messages import BootstrapInfo
from dpattn.models.tiny import ensure_default_model

Schema = dict[str, Any]
EXAMPLES = int(os.environ.get("DPATTN_GRAMMAR_PROPERTY_EXAMPLES", "0"))
PD_FULL = os.environ.get("DPATTN_PD_FULL") == "1"
CONTEXT = 512  # the tiny model's
MAX_PROMPT = 12
NUMBER_CHARS = 24  # "-", digits, "." and xgrammar's at most 6 decimals of a bounded number
PLAIN = {"temperature": 1.0, "ignore_eos": True, "max_new_tokens": 5}

# ---- schemas ----
NAMES = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=6)
# Enum strings exercise the grammar's escaping: quotes, backslashes, control and non-ASCII
# characters (surrogates excluded: not encodable, so never in a schema).
ENUM_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=4)
ENUM_VALUES = st.one_of(ENUM_TEXT, st.integers(-999, 999), st.booleans(), st.none())
# Bounds: integers, or decimals with at most 2 places (xgrammar writes at most 6).
BOUND = st.one_of(st.integers(-1000, 1000), st.integers(-100_000, 100_000).map(lambda n: n / 100))


@st.composite
def ranges(draw: st.DrawFn, kind: str) -> Schema:
    lo = draw(st.integers(-1000, 1000) if kind == "integer" else BOUND)
    width = draw(st.integers(0, 1000) if kind == "integer" else BOUND.map(abs))
    return {"type": kind, "minimum": lo, "maximum": round(lo + width, 2)}


@st.composite
def strings(draw: st.DrawFn) -> Schema:
    top = draw(st.integers(0, 6))
    schema: Schema = {"type": "string", "maxLength": top}
    if draw(st.booleans()):
        schema["minLength"] = draw(st.integers(0, top))
    return schema


LEAVES = st.one_of(
    ranges("integer"),
    ranges("number"),
    strings(),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.lists(ENUM_VALUES, min_size=1, max_size=4, unique_by=json.dumps).map(lambda v: {"enum": v}),
)


@st.composite
def objects(draw: st.DrawFn, children: st.SearchStrategy[Schema]) -> Schema:
    props = draw(st.dictionaries(NAMES, children, min_size=1, max_size=4))
    required = [name for name in props if draw(st.booleans())]
    return {"type": "object", "properties": props, "required": required}


@st.composite
def arrays(draw: st.DrawFn, children: st.SearchStrategy[Schema]) -> Schema:
    lo = draw(st.integers(0, 2))
    hi = draw(st.integers(lo, 3))
    return {"type": "array", "items": draw(children), "minItems": lo, "maxItems": hi}


def extend(children: st.SearchStrategy[Schema]) -> st.SearchStrategy[Schema]:
    return st.one_of(objects(children), arrays(children))


# A top-level object or array (what an API's JSON output is), at most 6 leaves deep inside.
SCHEMAS = extend(st.recursive(LEAVES, extend, max_leaves=6))


def max_tokens(schema: Schema) -> int:
    """An upper bound on the tokens of the grammar's longest output, compact as xgrammar
    writes it (", " and ": "): a token is at least one byte, a character at most 4 (6 or 12
    as an escape in an enum)."""
    if "enum" in schema:
        return max(len(json.dumps(v).encode()) for v in schema["enum"]) * 2
    kind = schema["type"]
    if kind == "object":
        fields = (len(k) + 6 + max_tokens(v) for k, v in schema["properties"].items())
        return 2 + sum(fields)
    if kind == "array":
        return 2 + schema["maxItems"] * (max_tokens(schema["items"]) + 2)
    if kind == "string":
        return 2 + 4 * schema["maxLength"]
    return {"boolean": 5, "null": 4}.get(kind, NUMBER_CHARS)


PROMPTS = st.lists(st.integers(3, 511), min_size=1, max_size=MAX_PROMPT)
CASES = st.lists(st.tuples(SCHEMAS, PROMPTS), min_size=1, max_size=4)


# ---- generation and checks ----
def constrained(schema: Schema, seed: int) -> dict[str, Any]:
    # + 1: the stop token the finished grammar allows (and ends the request with)
    budget = max_tokens(schema) + 1
    assume(budget <= CONTEXT - MAX_PROMPT)
    return {
        "json_schema": json.dumps(schema),
        "temperature": 1.0,
        "max_new_tokens": budget,
        "seed": seed,
    }


def requests(
    cases: list[tuple[Schema, list[int]]], plain: list[int] | None, seed: int
) -> tuple[list[list[int]], list[dict[str, Any]]]:
    """The example's requests: one per case, then the unconstrained one (if drawn)."""
    prompts = [p for _, p in cases]
    params = [constrained(s, seed + i) for i, (s, _) in enumerate(cases)]
    if plain is not None:
        prompts.append(plain)
        params.append({**PLAIN, "seed": seed})
    return prompts, params


def finish(out: dict[str, Any]) -> str:
    reason = out["meta_info"]["finish_reason"]
    return reason["type"] if isinstance(reason, dict) else reason  # /generate's is an object


def check(cases: list[tuple[Schema, list[int]]], outs: list[dict[str, Any]]) -> None:
    for (schema, _), out in zip(cases, outs):
        meta = out["meta_info"]
        where = f"schema {json.dumps(schema)} gave {out['text']!r} ({meta['finish_reason']})"
        assert finish(out) == "stop", where
        try:
            # strict: a raw control character inside a string fails too, as JSON says
            jsonschema.validate(json.loads(out["text"]), schema)
        except (ValueError, jsonschema.ValidationError) as e:
            raise AssertionError(f"{where}: {getattr(e, 'message', e)}") from None
    for out in outs[len(cases) :]:  # the unconstrained row: never masked, never stopped early
        assert finish(out) == "length"
        assert len(out["output_ids"]) == PLAIN["max_new_tokens"]


def property_settings(default: int) -> settings:
    return settings(
        max_examples=EXAMPLES or default,
        deadline=None,
        derandomize=not EXAMPLES,  # the default suite replays the same examples every run
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# An example: its (schema, prompt) pairs, maybe an unconstrained prompt, the sampling seed.
DRAWS = dict(cases=CASES, plain=st.none() | PROMPTS, seed=st.integers(0, 2**32))


# ---- colocated: (1,1) and (2,2) ----
@pytest.fixture(scope="module", params=[(1, 1), (2, 2)], ids=str)
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    tp, dp = request.param
    with Engine(str(ensure_default_model()), tp, dp, backend="thread") as eng:
        yield eng
        assert eng.kv_pools_full() and not eng._pending


@property_settings(default=20)
@given(**DRAWS, dp_rank=st.integers(0, 1))
def test_schema_outputs_validate(
    engine: Engine,
    cases: list[tuple[Schema, list[int]]],
    plain: list[int] | None,
    seed: int,
    dp_rank: int,
) -> None:
    prompts, params = requests(cases, plain, seed)
    # One DP group or the other takes the whole batch: mixed rows in one step on either.
    rank = dp_rank % engine.layout.dp_size
    outs = engine.generate(input_ids=prompts, sampling_params=params, dp_rank=rank)
    check(cases, outs)  # type: ignore[arg-type]


# ---- disaggregated: prefill (1,1) -> decode (2,2) ----
class PD:
    """A prefill and a decode engine, driven as the PD router drives their servers: each
    request goes to both with the same bootstrap room; the decode side's answer is the output
    (its first token came from the prefill side, sampled under the grammar there)."""

    def __init__(self) -> None:
        self.port = free_port()
        common: dict[str, Any] = dict(
            backend="thread", chunked_prefill_size=8, disable_radix_cache=True
        )
        model = str(ensure_default_model())
        self.prefill = Engine(
            model,
            1,
            1,
            disaggregation_mode="prefill",
            disaggregation_bootstrap_port=self.port,
            **common,
        )
        self.decode = Engine(
            model, 2, 2, disaggregation_mode="decode", disaggregation_heartbeat_s=0.2, **common
        )
        self._rooms = random.Random(0)
        self._servers: list[Uvicorn] = []  # router, decode, prefill: see router_url

    def generate(
        self, prompts: list[list[int]], params: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        rids = []
        for ids, sp in zip(prompts, params):
            p = SamplingParams.from_dict(sp)
            boot = BootstrapInfo("127.0.0.1", self.port, self._rooms.getrandbits(63))
            rids.append(
                (
                    self.prefill.submit(ids, p, bootstrap=boot),
                    self.decode.submit(ids, p, bootstrap=boot),
                )
            )
        outs = []
        for p_rid, d_rid in rids:
            first = self.prefill.result(p_rid, timeout=60)
            out = self.decode.result(d_rid, timeout=60)
            assert first["output_ids"] == out["output_ids"][:1], "the decode side's first token"
            outs.append(out)
        return outs

    def router_url(self) -> str:
        """The engines' HTTP servers behind the PD router (started on first use)."""
        if not self._servers:
            prefill, decode = Uvicorn(create_app(self.prefill)), Uvicorn(create_app(self.decode))
            router = PDRouter([PrefillServer(prefill.url, self.port)], [decode.url])
            self._servers = [Uvicorn(create_router_app(router)), decode, prefill]
        return self._servers[0].url

    def close(self) -> None:
        for srv in self._servers:
            srv.stop()
        for eng in (self.decode, self.prefill):
            eng.shutdown()


@pytest.fixture(scope="module")
def pd() -> Iterator[PD]:
    stack = PD()
    try:
        yield stack
        assert all(e.kv_pools_full() and not e._pending for e in (stack.prefill, stack.decode))
    finally:
        stack.close()


@property_settings(default=8)
@given(**DRAWS)
def test_schema_outputs_validate_disaggregated(
    pd: PD, cases: list[tuple[Schema, list[int]]], plain: list[int] | None, seed: int
) -> None:
    prompts, params = requests(cases, plain, seed)
    check(cases, pd.generate(prompts, params))


@pytest.mark.skipif(not PD_FULL, reason="HTTP through the PD router: DPATTN_PD_FULL=1")
@property_settings(default=8)
@given(**DRAWS)
def test_schema_outputs_validate_through_pd_router(
    pd: PD, cases: list[tuple[Schema, list[int]]], plain: list[int] | None, seed: int
) -> None:
    prompts, params = requests(cases, plain, seed)
    body = {"input_ids": prompts, "sampling_params": params}
    resp = httpx.post(pd.router_url() + "/generate", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    check(cases, resp.json())
