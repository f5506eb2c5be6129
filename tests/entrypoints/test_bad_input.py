"""No request input reaches a rank unchecked (issue 11, item 1): every bad input is a ValueError
(Python API) or a 4xx (HTTP) with the numbers, the same on every layout, and the engine keeps
serving with no KV slot leaked. Random bodies and id lists (hypothesis) included."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_harness import MODEL, ServerThread, _wait_for

from dpattn.entrypoints.engine import Engine
from dpattn.models.tiny import make_tiny_model

MODEL_VOCAB = 600  # larger than the tiny tokenizer's 512 ids: the model's vocab is the limit
CONTEXT = 512

# (what, generate() kwargs, a fragment of the ValueError) — each a distinct kind of bad input.
BAD_ENGINE_INPUTS: list[tuple[str, dict[str, Any], str]] = [
    ("id past the vocab", dict(input_ids=[3, MODEL_VOCAB]), "outside the model's vocabulary"),
    ("huge id", dict(input_ids=[3, 100000]), "[0, 600)"),
    ("negative id", dict(input_ids=[-1, 4]), "outside the model's vocabulary"),
    ("float id", dict(input_ids=[1, 2.0]), "not an integer"),
    ("bool id", dict(input_ids=[True, 2]), "not an integer"),
    ("string id", dict(input_ids=[1, "2"]), "not an integer"),
    ("empty ids", dict(input_ids=[]), "empty"),
    ("empty id in a batch", dict(input_ids=[[1, 2], []]), "must not be empty"),
    ("ids not a list", dict(input_ids=7), "must be a list"),
    ("prompt and ids", dict(prompt="x", input_ids=[1]), "exactly one"),
    ("prompt not text", dict(prompt=[1, 2]), "prompt must be a string"),
    ("prompt at context", dict(input_ids=[5] * CONTEXT), f"context length {CONTEXT}"),
    (
        "prompt + max_new over context",
        dict(input_ids=[5] * 500, sampling_params={"max_new_tokens": 13}),
        "500 prompt + 13 new = 513",
    ),
    (
        "max_new_tokens < 0",
        dict(input_ids=[1], sampling_params={"max_new_tokens": -1}),
        "max_new_tokens",
    ),
    ("max_new_tokens text", dict(input_ids=[1], sampling_params={"max_new_tokens": "9"}), ">= 1"),
    ("temperature < 0", dict(input_ids=[1], sampling_params={"temperature": -1}), ">= 0"),
    ("temperature NaN", dict(input_ids=[1], sampling_params={"temperature": math.nan}), ">= 0"),
    ("top_p 0", dict(input_ids=[1], sampling_params={"top_p": 0}), "top_p"),
    ("top_k 0", dict(input_ids=[1], sampling_params={"top_k": 0}), "top_k"),
    ("min_p > 1", dict(input_ids=[1], sampling_params={"min_p": 2}), "min_p"),
    ("empty stop", dict(input_ids=[1], sampling_params={"stop": [""]}), "stop"),
    ("stop not text", dict(input_ids=[1], sampling_params={"stop": [3]}), "stop"),
    ("stop id past vocab", dict(input_ids=[1], sampling_params={"stop_token_ids": [900]}), "600"),
    ("negative seed", dict(input_ids=[1], sampling_params={"seed": -3}), "seed"),
    ("seed >= 2**63", dict(input_ids=[1], sampling_params={"seed": 2**64}), "seed"),
    ("unknown param", dict(input_ids=[1], sampling_params={"beam": 2}), "unknown sampling"),
    ("params not a dict", dict(input_ids=[1], sampling_params="greedy"), "must be a dict"),
    ("ignore_eos not bool", dict(input_ids=[1], sampling_params={"ignore_eos": 1}), "ignore_eos"),
    ("dp_rank out of range", dict(input_ids=[1], dp_rank=2), "dp_rank"),
    ("dp_rank not int", dict(input_ids=[1], dp_rank="0"), "dp_rank"),
    ("params list too short", dict(input_ids=[[1], [2]], sampling_params=[{}]), "2 entries"),
    ("return_logprob not bool", dict(input_ids=[1], return_logprob="yes"), "return_logprob"),
]


@pytest.fixture(scope="module")
def big_vocab_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vocab600")
    return make_tiny_model("llama", root / "llama600", seed=0, vocab_size=MODEL_VOCAB)


@pytest.fixture(scope="module")
def engines(big_vocab_model: Path) -> Iterator[dict[tuple[int, int], Engine]]:
    """The same model at attention-TP 1 and 2: a bad id used to fail differently on each."""
    out = {}
    try:
        for layout in ((1, 1), (2, 1)):
            out[layout] = Engine(str(big_vocab_model), *layout, backend="thread")
        yield out
        for engine in out.values():
            assert _wait_for(engine.kv_pools_full), "KV slots leaked"
    finally:
        for engine in out.values():
            engine.shutdown()


def _error(engine: Engine, kwargs: dict[str, Any]) -> str:
    with pytest.raises(ValueError) as info:
        engine.generate(**kwargs)
    return str(info.value)


def test_bad_inputs_are_value_errors_identical_on_every_layout(
    engines: dict[tuple[int, int], Engine],
) -> None:
    assert len({what for what, _, _ in BAD_ENGINE_INPUTS}) >= 15
    for what, kwargs, fragment in BAD_ENGINE_INPUTS:
        messages = {layout: _error(engine, kwargs) for layout, engine in engines.items()}
        assert len(set(messages.values())) == 1, f"{what}: differs by layout: {messages}"
        assert fragment in next(iter(messages.values())), f"{what}: {messages}"
    greedy = {"max_new_tokens": 4, "temperature": 0}
    # An id the tokenizer does not know but the model does is a valid input, on every layout.
    outs = [e.generate(input_ids=[3, 550], sampling_params=greedy) for e in engines.values()]
    assert all(o["meta_info"]["completion_tokens"] == 4 for o in outs)  # type: ignore[index]
    assert len({tuple(o["output_ids"]) for o in outs}) == 1  # type: ignore[index]
    tiny_t = [
        e.generate(input_ids=[1], sampling_params={"temperature": 1e-300}) for e in engines.values()
    ]
    assert all(len(o["output_ids"]) == 16 for o in tiny_t)  # type: ignore[index]


def test_http_checks_ids_against_the_model_vocab(
    engines: dict[tuple[int, int], Engine],
) -> None:
    srv = ServerThread(engines[(2, 1)])
    try:
        ok = httpx.post(srv.url + "/v1/completions", json={"prompt": [3, 550], "max_tokens": 2})
        assert ok.status_code == 200, ok.text
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": [3, 600], "max_tokens": 2})
        assert r.status_code == 400
        assert "[0, 600)" in r.json()["error"]["message"]
        models = httpx.get(srv.url + "/v1/models").json()["data"][0]
        assert models["max_model_len"] == engines[(2, 1)].context_length == CONTEXT
    finally:
        srv.stop()


# ---- HTTP: distinct bad inputs on the shared server (tp=2 dp=2, threads) ----
LONG = list(range(1, 500))
BAD_HTTP: list[tuple[str, str, Any, int, str | None]] = [
    ("negative id", "/v1/completions", {"prompt": [1, -4]}, 400, "prompt"),
    ("id past vocab", "/v1/completions", {"prompt": [1, 512]}, 400, "prompt"),
    ("ids in a batch", "/v1/completions", {"prompt": [[1], [2, 9999]]}, 400, "prompt"),
    ("float ids", "/v1/completions", {"prompt": [1.5, 2]}, 400, "prompt"),
    ("prompt + max_tokens", "/v1/completions", {"prompt": LONG, "max_tokens": 20}, 400, "max_tokens"),
    ("negative seed", "/v1/completions", {"prompt": "x", "seed": -1}, 400, "seed"),
    ("top_p 0", "/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("top_k -5", "/v1/completions", {"prompt": "x", "top_k": -5}, 400, "top_k"),
    ("min_p 3", "/v1/completions", {"prompt": "x", "min_p": 3}, 400, "min_p"),
    ("17 stops", "/v1/completions", {"prompt": "x", "stop": ["a"] * 17}, 400, "stop"),
    ("empty stop", "/v1/completions", {"prompt": "x", "stop": ""}, 400, "stop"),
    ("stop id < 0", "/v1/completions", {"prompt": "x", "stop_token_ids": [-2]}, 400, "stop_token_ids"),
    ("n 17", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 17}, 400, "n"),
    ("generate: id past vocab", "/generate", {"input_ids": [1, 70000]}, 400, "input_ids"),
    ("generate: empty batch", "/generate", {"input_ids": []}, 400, "input_ids"),
    ("generate: bad params", "/generate", {"text": "x", "sampling_params": {"top_k": 0}}, 400, "sampling_params"),
    ("generate: params type", "/generate", {"text": "x", "sampling_params": [1]}, 400, "sampling_params"),
    ("generate: prompt + max_new", "/generate", {"input_ids": LONG, "sampling_params": {"max_new_tokens": 99}}, 400, None),
    ("generate: stop id past vocab", "/generate", {"input_ids": [1], "sampling_params": {"stop_token_ids": [512]}}, 400, None),
    ("generate: huge seed", "/generate", {"input_ids": [1], "sampling_params": {"seed": 2**64}}, 400, None),
    ("body not JSON", "/generate", b"\xff\xfe", 400, None),
]  # fmt: skip


def test_bad_http_inputs_are_4xx_with_the_numbers(server: ServerThread) -> None:
    assert len({what for what, *_ in BAD_HTTP}) >= 15
    for what, path, body, status, param in BAD_HTTP:
        kw: dict[str, Any] = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = httpx.post(server.url + path, timeout=30, **kw)
        assert r.status_code == status, (what, r.text)
        err = r.json()["error"]
        assert err["message"], what
        if param is not None:
            assert err["param"] == param, (what, err)
    r = httpx.post(server.url + "/v1/completions", json={"prompt": LONG, "max_tokens": 20})
    assert "499 prompt tokens and asks for 20 more" in r.json()["error"]["message"]
    assert _wait_for(server.state.engine.kv_pools_full)


# ---- hypothesis: random bodies and id lists ----
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**65), 2**65),
    st.floats(allow_nan=False),
    st.text(max_size=8),
)
FIELD_VALUES = {
    "prompt": st.one_of(
        st.text(max_size=12),
        st.lists(st.integers(-3, 700), max_size=6),
        st.lists(st.lists(st.integers(-3, 700), max_size=4), max_size=3),
        JSON_SCALARS,
    ),
    "max_tokens": st.one_of(st.sampled_from([-1, 0, 1, 3, 10**9, 2.5, "4"]), st.none()),
    "n": st.sampled_from([-1, 0, 1, 2, 17, 1.0, "2"]),
    "temperature": st.one_of(st.sampled_from([-1, 0, 0.5, 3, 1e-300, "hot"]), st.none()),
    "top_p": st.sampled_from([0, 0.5, 1, 2, -0.1]),
    "top_k": st.sampled_from([-2, -1, 0, 1, 5, 10**12]),
    "min_p": st.sampled_from([0, 0.1, 1, 1.5]),
    "seed": st.sampled_from([-1, 0, 7, 2**63, 2**64, "s"]),
    "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=3), JSON_SCALARS),
    "stop_token_ids": st.lists(st.integers(-3, 700), max_size=3),
    "logprobs": st.sampled_from([0, 1, -1, True]),
    "dp_rank": st.sampled_from([-1, 0, 1, 2, "0"]),
    "stream": st.booleans(),
    "ignore_eos": st.sampled_from([True, False, 1]),
    "bogus": JSON_SCALARS,
}
BODIES = st.one_of(
    st.fixed_dictionaries({}, optional=FIELD_VALUES),
    st.fixed_dictionaries({"messages": st.just([{"role": "user", "content": "hi"}])}, optional={k: v for k, v in FIELD_VALUES.items() if k != "prompt"}),
    st.recursive(JSON_SCALARS, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3), max_leaves=6),
)  # fmt: skip
PATHS = st.sampled_from(["/v1/completions", "/v1/chat/completions", "/generate"])


@settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(path=PATHS, body=BODIES)
def test_random_http_bodies_never_hurt_the_engine(
    server: ServerThread, path: str, body: Any
) -> None:
    if path == "/generate" and isinstance(body, dict):  # give the native route its own names
        body = {"input_ids" if k == "prompt" else k: v for k, v in body.items()}
        body = {k: v for k, v in body.items() if k in ("input_ids", "text", "stream")}
    if isinstance(body, dict) and body.get("max_tokens") == 10**9 and body.get("stream"):
        body["max_tokens"] = 3
    r = httpx.post(server.url + path, content=json.dumps(body), timeout=60)
    assert r.status_code in (200, 400, 404), r.text
    if r.status_code != 200:
        assert r.json()["error"]["message"]
    assert server.state.engine.failure is None


def test_engine_serves_after_random_http_bodies(server: ServerThread) -> None:
    engine = server.state.engine
    assert _wait_for(engine.kv_pools_full), "KV slots leaked"
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "ok"})
    assert r.status_code == 200


IDS = st.lists(
    st.one_of(st.integers(-2, 520), st.booleans(), st.floats(allow_nan=True), st.text(max_size=1)),
    max_size=6,
)
PARAMS = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {"max_new_tokens": st.sampled_from([1, 2, 0, -3, 600, 2.0])},
        optional={
            "temperature": st.sampled_from([0, 1e-300, 1e300, -1, math.inf]),
            "top_k": st.sampled_from([-1, 0, 1, 10**9]),
            "top_p": st.sampled_from([1, 0.5, 0, math.nan]),
            "seed": st.sampled_from([0, -1, 2**63, None]),
            "stop_token_ids": st.lists(st.integers(-1, 600), max_size=2),
            "stop": st.sampled_from([[], ["a"], [""], "b", [None]]),
        },
    ),
)


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ids=IDS, params=PARAMS, dp_rank=st.sampled_from([None, 0, 1, 2, -1]))
def test_random_ids_and_params_at_the_engine(
    server: ServerThread, ids: list[Any], params: Any, dp_rank: Any
) -> None:
    engine = server.state.engine
    try:
        out = engine.generate(input_ids=ids, sampling_params=params, dp_rank=dp_rank)
    except ValueError:
        pass
    else:
        assert out["meta_info"]["finish_reason"] in ("length", "stop")  # type: ignore[index]
    assert engine.failure is None
    assert not engine._pending
