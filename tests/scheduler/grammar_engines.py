"""What the Engine-level grammar tests share: the constraints, prompts and checks, and a thread
engine that checks every rank when it shuts down."""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import jsonschema

from dpattn.entrypoints.engine import Engine

LAYOUTS = [(1, 1), (2, 2)]
SCHEMA = {  # short keys: few tokens per output, every kind of constraint
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^[a-z]{1,4}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
        "pos": {
            "type": "object",
            "properties": {
                "x": {"type": "integer", "minimum": -5, "maximum": 5},
                "ok": {"type": "boolean"},
            },
            "required": ["x", "ok"],
            "additionalProperties": False,
        },
        "kind": {"enum": ["cat", None]},
        # optional, any characters: xgrammar 0.2.9 alone would let a length-bounded string
        # hold raw control characters (invalid JSON; mlc-ai/xgrammar#800, see test_grammar.py)
        "note": {"type": "string", "maxLength": 2},
    },
    "required": ["id", "age", "tags", "pos", "kind"],
    "additionalProperties": False,
}
REGEX = r"(19|20)\d{2}-(0[1-9]|1[0-2])-[0-3]\d"  # a date
EBNF = 'root ::= "yes" | "no" | "maybe " [0-9]'
EBNF_LANGUAGE = {"yes", "no"} | {f"maybe {d}" for d in range(10)}
GRAMMARS = {"json_schema": json.dumps(SCHEMA), "regex": REGEX, "ebnf": EBNF}
LETTERS = "[a-z]{40}"  # long enough to keep a row constrained for many steps
PROMPTS = [
    "The quick brown fox",
    "Once upon a time there was a little village",
    "Attention is a function of queries, keys and values.",
    "What time is it?",
]
FORCED_PROMPT = "Once upon a time there was"  # its 10 greedy tokens are printable ASCII
LONG_PROMPT = (
    "Once upon a time there was a little village by the sea. Every morning the fishermen "
    "went out in their boats, and every evening they came back with baskets full of fish."
)


@contextlib.contextmanager
def thread_engine(model: str, tp: int, dp: int, **options: Any) -> Iterator[Engine]:
    engine = Engine(model, tp, dp, backend="thread", **options)
    try:
        yield engine
    finally:
        engine.shutdown()
    # Every rank, not only the DP group leaders the frontend hears from: no KV slot leaked,
    # and the ranks of a group took the same steps (admitted and failed requests together).
    # With pipeline stages every stage's group too (results: stage-major).
    results, layout = engine.rank_results, engine.layout
    assert len(results) == layout.world_size
    assert all(r["kv_free_after_flush"] == r["kv_total"] for r in results), results
    for stage in range(layout.pp_size):
        for d in range(dp):
            group = [results[g] for g in layout.attn_tp_ranks(d, stage)]
            assert len({r["steps"] for r in group}) == 1, results


def check_valid(kind: str, text: str) -> None:
    if kind == "json_schema":
        jsonschema.validate(json.loads(text), SCHEMA)
    elif kind == "regex":
        assert re.fullmatch(REGEX, text), text
    elif kind == "ebnf":
        assert text in EBNF_LANGUAGE, text
    else:
        assert re.fullmatch(kind, text), text  # a regex of the test's own


def check_done(out: dict[str, Any], kind: str, eos: int) -> None:
    meta = out["meta_info"]
    assert meta["finish_reason"] == "stop", (meta, out["text"])
    assert out["output_ids"][-1] == eos and meta["matched_stop"] == eos  # the grammar's end
    check_valid(kind, out["text"])


def assert_idle(engine: Engine) -> None:
    """Nothing leaked: every KV slot free, nothing pending, no request in flight."""
    deadline = time.monotonic() + 10
    while not engine.kv_pools_full() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.kv_free == engine.kv_total, "KV slots leaked"
    assert engine.router.inflight == [0] * engine.layout.dp_size
    assert not engine._pending


def final_delta(engine: Engine, rid: str) -> Any:
    """The last delta of rid (finish reason, error, error_status); the request is released."""
    deltas = list(engine.stream(rid, timeout=60))
    engine.release(rid)
    return deltas[-1]


def plain_params(n: int = 12) -> dict[str, Any]:
    return {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}
