"""Constrained decoding through the Engine (thread backend, the tiny default model): outputs that
always parse, rows without a grammar untouched, logprobs the model's own, the scheduler's paths
(chunked prefill, prefix cache, n > 1, retraction) under grammars, grammar failures on the ranks
(400, nothing leaked), the attn_tp ranks' agreement when one rank's compile is slow or fails,
an abort in the grammar queue, and --debug-lockstep. executor/test_grammar.py tests the pieces."""

from __future__ import annotations

import contextlib
import json
import math
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest

from dpattn.entrypoints.engine import Engine
from dpattn.executor.grammar import XGrammarBackend
from dpattn.executor.sampling_params import SamplingParams
from dpattn.models.tiny import TOKENIZER_VOCAB_SIZE, ensure_default_model, make_tiny_model

pytestmark = pytest.mark.timeout(120)  # an agreement bug hangs: fail instead

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


@pytest.fixture(scope="module")
def model() -> str:
    return str(ensure_default_model())


@pytest.fixture(scope="module")
def eos(model: str) -> int:
    from transformers import AutoTokenizer

    return int(AutoTokenizer.from_pretrained(model).eos_token_id)


@contextlib.contextmanager
def _engine(model: str, tp: int, dp: int, **options: Any) -> Iterator[Engine]:
    engine = Engine(model, tp, dp, backend="thread", **options)
    try:
        yield engine
    finally:
        engine.shutdown()
    # Every rank, not only the DP group leaders the frontend hears from: no KV slot leaked,
    # and the ranks of a group took the same steps (admitted and failed requests together).
    results = engine.rank_results
    assert len(results) == tp
    assert all(r["kv_free_after_flush"] == r["kv_total"] for r in results), results
    a = tp // dp
    for d in range(dp):
        assert len({r["steps"] for r in results[d * a : (d + 1) * a]}) == 1, results


def _check_valid(kind: str, text: str) -> None:
    if kind == "json_schema":
        jsonschema.validate(json.loads(text), SCHEMA)
    elif kind == "regex":
        assert re.fullmatch(REGEX, text), text
    elif kind == "ebnf":
        assert text in EBNF_LANGUAGE, text
    else:
        assert re.fullmatch(kind, text), text  # a regex of the test's own


def _check_done(out: dict[str, Any], kind: str, eos: int) -> None:
    meta = out["meta_info"]
    assert meta["finish_reason"] == "stop", (meta, out["text"])
    assert out["output_ids"][-1] == eos and meta["matched_stop"] == eos  # the grammar's end
    _check_valid(kind, out["text"])


def _idle(engine: Engine) -> None:
    """Nothing leaked: every KV slot free, nothing pending, no request in flight."""
    deadline = time.monotonic() + 10
    while not engine.kv_pools_full() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.kv_free == engine.kv_total, "KV slots leaked"
    assert engine.router.inflight == [0] * engine.layout.dp_size
    assert not engine._pending


def _final(engine: Engine, rid: str) -> Any:
    """The last delta of rid (finish reason, error, error_status); the request is released."""
    deltas = list(engine.stream(rid, timeout=60))
    engine.release(rid)
    return deltas[-1]


def _plain(n: int = 12) -> dict[str, Any]:
    return {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}


# ---- every output valid ----


@pytest.mark.parametrize("tp,dp", LAYOUTS)
def test_outputs_always_valid(model: str, eos: int, tp: int, dp: int) -> None:
    items = [(kind, PROMPTS[s % 2], s) for kind in GRAMMARS for s in range(4)]
    # Odd seeds ignore EOS: the grammar's own end stops them (its matcher terminated).
    params = [
        {"max_new_tokens": 120, "temperature": 1.0, "seed": s, "ignore_eos": s % 2 == 1}
        | {kind: GRAMMARS[kind]}
        for kind, _, s in items
    ]
    with _engine(model, tp, dp) as engine:
        outs = engine.generate(
            prompt=[p for _, p, _ in items] + PROMPTS[:2],
            sampling_params=params + [_plain()] * 2,
        )
        for (kind, _, _), out in zip(items, outs):
            _check_done(out, kind, eos)
        assert all(len(o["output_ids"]) == 12 for o in outs[len(items) :])
        texts = {
            kind: {o["text"] for (k, _, _), o in zip(items, outs) if k == kind} for kind in GRAMMARS
        }
        assert all(len(t) > 1 for t in texts.values()), texts  # the seeds sampled, not one path
        stats = [s for _, s in engine.step_stats]
        assert max(s.constrained for s in stats) > 0
        assert sum(s.grammar_s for s in stats) > 0
        _idle(engine)


def test_padded_vocabulary(tmp_path_factory: pytest.TempPathFactory, eos: int) -> None:
    """A model vocabulary past the tokenizer's, not a multiple of 32, split over attn_tp 2
    (vocab-parallel head, padded shards): the ids past the tokenizer are never sampled under a
    grammar, though the unconstrained model samples them."""
    vocab = TOKENIZER_VOCAB_SIZE + 5
    path = make_tiny_model("llama", tmp_path_factory.mktemp("padded") / "llama", vocab_size=vocab)
    with _engine(str(path), 2, 1) as engine:
        free = engine.generate(
            prompt=PROMPTS,
            sampling_params=[
                {"max_new_tokens": 48, "temperature": 1.0, "seed": s, "ignore_eos": True}
                for s in range(len(PROMPTS))
            ],
        )
        assert max(max(o["output_ids"]) for o in free) >= TOKENIZER_VOCAB_SIZE  # sensitive
        grammars = [*GRAMMARS.items(), ("regex", LETTERS)]
        outs = engine.generate(
            prompt=PROMPTS,
            sampling_params=[
                {"max_new_tokens": 120, "temperature": 1.0, "seed": s, kind: text}
                for s, (kind, text) in enumerate(grammars)
            ],
        )
        for (kind, text), out in zip(grammars, outs):
            _check_done(out, text if text == LETTERS else kind, eos)
            assert max(out["output_ids"]) < TOKENIZER_VOCAB_SIZE
        _idle(engine)


# ---- rows without a grammar, and logprobs ----


@pytest.mark.parametrize("tp,dp", LAYOUTS)
def test_rows_without_grammar_untouched(model: str, tp: int, dp: int) -> None:
    """Greedy outputs of unconstrained requests are token-equal with and without constrained
    batch-mates (interleaved, so the constrained rows sit at every position of the batch)."""
    with _engine(model, tp, dp) as engine:
        ref = engine.generate(prompt=PROMPTS, sampling_params=_plain(16))
        prompts, params = [], []
        for i, p in enumerate(PROMPTS):
            prompts += [PROMPTS[-1 - i], p]
            params += [{"max_new_tokens": 48, "temperature": 1.0, "seed": i, "regex": LETTERS}]
            params += [_plain(16)]
        mixed = engine.generate(prompt=prompts, sampling_params=params)
        assert [o["output_ids"] for o in mixed[1::2]] == [o["output_ids"] for o in ref]
        for o in mixed[0::2]:  # the constrained ones were constrained all along
            assert re.fullmatch(LETTERS, o["text"]), o["text"]
        _idle(engine)


@pytest.mark.parametrize("tp,dp", LAYOUTS)
def test_constrained_logprobs_are_the_models_own(model: str, eos: int, tp: int, dp: int) -> None:
    with _engine(model, tp, dp) as engine:
        ids = engine.tokenizer.encode(FORCED_PROMPT)
        # (1) Sampled under a grammar: each logprob is the unmasked model's, as scoring the
        # same tokens as a prompt gives them (the masked distribution over ten digits would
        # give the sampled tokens logprobs above -log 10).
        out = engine.generate(
            input_ids=ids,
            sampling_params={
                "max_new_tokens": 16,
                "temperature": 1.0,
                "seed": 3,
                "regex": "[0-9]{10}",
            },
            return_logprob=True,
            top_logprobs_num=2,
        )
        toks = out["output_ids"]
        assert toks[-1] == eos and re.fullmatch("[0-9]{10}", out["text"])
        got = out["meta_info"]["output_token_logprobs"]
        assert [t for _, t in got] == toks
        scored = engine.generate(
            input_ids=ids + toks,
            sampling_params={"max_new_tokens": 0},
            return_logprob=True,
            logprob_start_len=len(ids),
            top_logprobs_num=2,
        )["meta_info"]
        assert [t for _, t in scored["input_token_logprobs"]] == toks
        assert [lp for lp, _ in got] == pytest.approx(
            [lp for lp, _ in scored["input_token_logprobs"]], abs=1e-4
        )
        assert min(lp for lp, _ in got) < -math.log(10) - 0.5
        for mine, theirs in zip(
            out["meta_info"]["output_top_logprobs"], scored["input_top_logprobs"]
        ):
            assert [t for _, t in mine] == [t for _, t in theirs]  # top-2 of the whole vocabulary
        # (2) A grammar that forces exactly the unconstrained greedy tokens reproduces them and
        # their logprobs, then ends (only EOS is left).
        free = engine.generate(input_ids=ids, sampling_params=_plain(10), return_logprob=True)
        text = free["text"]
        assert eos not in free["output_ids"] and text.isascii() and text.isprintable(), text
        assert engine.tokenizer.encode(text) and engine.tokenizer.decode(free["output_ids"]) == text
        literal = text.replace("\\", "\\\\").replace('"', '\\"')
        forced = engine.generate(
            input_ids=ids,
            sampling_params={
                "max_new_tokens": 20,
                "temperature": 0,
                "ebnf": f'root ::= "{literal}"',
            },
            return_logprob=True,
        )
        assert forced["output_ids"] == free["output_ids"] + [eos]
        assert forced["meta_info"]["finish_reason"] == "stop"
        want = [lp for lp, _ in free["meta_info"]["output_token_logprobs"]]
        have = [lp for lp, _ in forced["meta_info"]["output_token_logprobs"]]
        assert have[:-1] == pytest.approx(want, abs=1e-5)
        _idle(engine)


# ---- the scheduler's paths under grammars ----


@pytest.mark.parametrize("tp,dp", LAYOUTS)
def test_chunked_prefill_and_prefix_cache(model: str, eos: int, tp: int, dp: int) -> None:
    """A long prompt prefilled in 8-token chunks, then the same prompt again (served from the
    prefix cache): greedy outputs equal the unchunked, uncached run's, and valid."""
    params = [{"max_new_tokens": 120, "temperature": 0, k: GRAMMARS[k]} for k in GRAMMARS]
    with _engine(model, tp, dp, disable_radix_cache=True) as engine:
        ref = engine.generate(prompt=[LONG_PROMPT] * 3, sampling_params=params)
    for out, kind in zip(ref, GRAMMARS):
        _check_done(out, kind, eos)
    with _engine(model, tp, dp, chunked_prefill_size=8) as engine:
        n = len(engine.tokenizer.encode(LONG_PROMPT))
        assert n > 4 * 8
        for round_ in range(2):
            for kind, p, want in zip(GRAMMARS, params, ref):
                out = engine.generate(prompt=LONG_PROMPT, sampling_params=p, dp_rank=0)
                assert out["output_ids"] == want["output_ids"], (kind, round_)
                cached = out["meta_info"]["cached_tokens"]
                assert cached >= (n - 1 if round_ else 0), (kind, round_, cached)
        chunks = [s for _, s in engine.step_stats if s.constrained]
        assert chunks
        _idle(engine)


@pytest.mark.parametrize("tp,dp", LAYOUTS)
def test_n_choices_of_one_prompt(model: str, eos: int, tp: int, dp: int) -> None:
    """Several choices of one prompt with their own seeds (one batch, one shared prompt): each
    valid, and each the same as its seed alone."""
    seeds = [11, 12, 13]
    params = [
        {
            "max_new_tokens": 120,
            "temperature": 1.0,
            "seed": s,
            "json_schema": GRAMMARS["json_schema"],
        }
        for s in seeds
    ]
    with _engine(model, tp, dp) as engine:
        together = engine.generate(
            prompt=[PROMPTS[0]] * len(seeds), sampling_params=params, dp_rank=0
        )
        for out in together:
            _check_done(out, "json_schema", eos)
        assert len({o["text"] for o in together}) > 1
        for p, out in zip(params, together):
            alone = engine.generate(prompt=PROMPTS[0], sampling_params=p)
            assert alone["output_ids"] == out["output_ids"]
        _idle(engine)


@pytest.mark.parametrize("tp,dp", LAYOUTS)
def test_retraction_keeps_grammar_state(model: str, eos: int, tp: int, dp: int) -> None:
    """A KV pool too small for every request at once: requests are retracted mid-grammar and
    re-prefilled; their greedy outputs equal the run without pressure, all valid."""
    prompts = [f"{i}{i} " + LONG_PROMPT[:70] for i in range(3 * dp)]  # no shared prefix
    params = {"max_new_tokens": 50, "temperature": 0, "regex": LETTERS}
    with _engine(model, tp, dp) as engine:
        ref = engine.generate(prompt=prompts, sampling_params=params)
        assert sum(engine.retractions) == 0
    with _engine(model, tp, dp, kv_pool_tokens=90) as engine:
        outs = engine.generate(prompt=prompts, sampling_params=params)
        assert all(r > 0 for r in engine.retractions), engine.retractions
        _idle(engine)
    for out, want in zip(outs, ref):
        _check_done(out, LETTERS, eos)
        assert out["output_ids"] == want["output_ids"]


# ---- grammars that fail on the ranks ----


def _fails_with_400(engine: Engine, prompt: str, params: dict[str, Any], words: str) -> None:
    ids = engine.tokenizer.encode(prompt)
    rid = engine.submit(ids, SamplingParams.from_dict(params))
    end = _final(engine, rid)
    assert end.finish_reason == "abort"
    assert end.error_status == 400
    assert words in end.error, end.error


def _serves_after(engine: Engine) -> None:
    plain = engine.generate(prompt=PROMPTS[0], sampling_params=_plain())
    assert len(plain["output_ids"]) == 12
    _idle(engine)


@pytest.mark.parametrize("tp,dp", LAYOUTS)
def test_grammar_backend_none(model: str, tp: int, dp: int) -> None:
    with _engine(model, tp, dp, grammar_backend="none") as engine:
        for kind in GRAMMARS:
            p = {"max_new_tokens": 8, kind: GRAMMARS[kind]}
            _fails_with_400(engine, PROMPTS[0], p, "constrained decoding is off")
        # Beside plain requests (sent together): they are served, the grammar one fails.
        rids = [
            engine.submit(engine.tokenizer.encode(p), SamplingParams.from_dict(sp))
            for p, sp in [
                (PROMPTS[0], _plain()),
                (PROMPTS[1], {"max_new_tokens": 8, "regex": REGEX}),
                (PROMPTS[2], _plain()),
            ]
        ]
        ends = [_final(engine, rid) for rid in rids]
        assert [e.finish_reason for e in ends] == ["length", "abort", "length"]
        assert ends[1].error_status == 400 and ends[0].error_status == 0
        _serves_after(engine)


@pytest.fixture
def boom(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every compile of a regex containing "boom" fails, on every rank."""
    compile_ = XGrammarBackend._compile

    def failing(self: XGrammarBackend, key: tuple[str, str]) -> Any:
        if "boom" in key[1]:
            raise RuntimeError("[12:00:00] /xgrammar/compiler.cc:1: the compiler went boom")
        return compile_(self, key)

    monkeypatch.setattr(XGrammarBackend, "_compile", failing)


@pytest.mark.parametrize("tp,dp", LAYOUTS)
def test_compile_failure_ends_request_with_400(
    model: str, eos: int, tp: int, dp: int, boom: None
) -> None:
    with _engine(model, tp, dp) as engine:
        for _ in range(2):  # the second from the failure cache
            _fails_with_400(
                engine,
                PROMPTS[0],
                {"max_new_tokens": 8, "regex": "boom|bang"},
                "regex: the compiler went boom",
            )
        ok = engine.generate(
            prompt=PROMPTS[0], sampling_params={"max_new_tokens": 96, "regex": REGEX}
        )
        _check_done(ok, "regex", eos)
        _serves_after(engine)


# ---- agreement inside a DP group (attn_tp 2) ----


class RankFault:
    """XGrammarBackend patched so that only one rank thread's compiles misbehave: fail, sleep,
    or block on a gate (which the fixture opens at the end)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rank = "rank1"
        self.mode = "fail"
        self.gate = threading.Event()
        self.started = threading.Event()  # a blocked compile began: its request is queued
        self.seen: set[str] = set()
        init, compile_ = XGrammarBackend.__init__, XGrammarBackend._compile
        fault = self

        def patched_init(self: Any, *args: Any, **kw: Any) -> None:
            init(self, *args, **kw)
            self.rank_thread = threading.current_thread().name  # the scheduler's thread

        def patched_compile(self: Any, key: tuple[str, str]) -> Any:
            fault.seen.add(self.rank_thread)
            if self.rank_thread == fault.rank:
                if fault.mode == "fail":
                    raise RuntimeError(f"only {fault.rank} failed")
                if fault.mode == "slow":
                    time.sleep(0.5)
                if fault.mode == "block":
                    fault.started.set()
                    assert fault.gate.wait(30)
            return compile_(self, key)

        monkeypatch.setattr(XGrammarBackend, "__init__", patched_init)
        monkeypatch.setattr(XGrammarBackend, "_compile", patched_compile)


@pytest.fixture
def rank_fault(monkeypatch: pytest.MonkeyPatch) -> Iterator[RankFault]:
    fault = RankFault(monkeypatch)
    yield fault
    fault.gate.set()


@pytest.mark.parametrize("rank", ["rank0", "rank1"])
def test_one_rank_fails_the_whole_group(model: str, rank_fault: RankFault, rank: str) -> None:
    rank_fault.rank = rank
    with _engine(model, 2, 1, debug_lockstep=True) as engine:
        # Whichever rank failed, its reason reaches the client (the ranks gather them).
        why = f"only {rank} failed"
        for _ in range(2):
            _fails_with_400(engine, PROMPTS[0], {"max_new_tokens": 8, "regex": REGEX}, why)
        assert rank_fault.seen == {"rank0", "rank1"}
        _serves_after(engine)


def test_one_slow_rank_is_waited_for(model: str, eos: int, rank_fault: RankFault) -> None:
    rank_fault.mode = "slow"
    with _engine(model, 2, 1, debug_lockstep=True) as engine:
        t0 = time.monotonic()
        outs = engine.generate(
            prompt=PROMPTS[:2] + PROMPTS[:1],
            sampling_params=[
                {"max_new_tokens": 96, "temperature": 1.0, "seed": 1, "regex": REGEX},
                _plain(),  # not held back by the grammar's compile
                {"max_new_tokens": 96, "temperature": 1.0, "seed": 2, "ebnf": EBNF},
            ],
        )
        assert time.monotonic() - t0 >= 0.5
        _check_done(outs[0], "regex", eos)
        _check_done(outs[2], "ebnf", eos)
        assert len(outs[1]["output_ids"]) == 12
        assert max(s.grammar_queue for _, s in engine.step_stats) >= 1
        _idle(engine)


def test_one_rank_times_out(model: str, eos: int, rank_fault: RankFault) -> None:
    rank_fault.mode = "block"
    with _engine(model, 2, 1, grammar_compile_timeout=0.3, debug_lockstep=True) as engine:
        _fails_with_400(
            engine,
            PROMPTS[0],
            {"max_new_tokens": 8, "regex": REGEX},
            "timed out after 0.3 s",  # rank1's reason, gathered by the leader
        )
        rank_fault.rank = "rank0"  # now the leader is the stuck one: it names the timeout
        _fails_with_400(
            engine, PROMPTS[0], {"max_new_tokens": 8, "ebnf": EBNF}, "timed out after 0.3 s"
        )
        _serves_after(engine)
        rank_fault.gate.set()  # the stuck compiles end: the same grammars now work
        deadline = time.monotonic() + 10
        while True:
            out = engine.generate(
                prompt=PROMPTS[0], sampling_params={"max_new_tokens": 96, "regex": REGEX}
            )
            if out["meta_info"]["finish_reason"] == "stop" or time.monotonic() > deadline:
                break
        _check_done(out, "regex", eos)
        _idle(engine)


# ---- abort in the grammar queue ----


@pytest.mark.parametrize("tp,dp", [*LAYOUTS, (2, 1)])  # (2, 1): rank1 has it, rank0 not
def test_abort_while_waiting_for_the_grammar(
    model: str, eos: int, tp: int, dp: int, rank_fault: RankFault
) -> None:
    rank_fault.mode = "block"
    rank_fault.rank = "rank0"
    with _engine(model, tp, dp) as engine:
        ids = engine.tokenizer.encode(PROMPTS[0])
        rid = engine.submit(ids, SamplingParams(max_new_tokens=8, regex=REGEX), dp_rank=0)
        assert rank_fault.started.wait(10), "the request never reached the grammar queue"
        engine.abort(rid)
        end = _final(engine, rid)
        assert end.finish_reason == "abort" and end.error_status == 0
        _serves_after(engine)
        rank_fault.gate.set()
        out = engine.generate(
            prompt=PROMPTS[0], sampling_params={"max_new_tokens": 96, "regex": REGEX}
        )
        _check_done(out, "regex", eos)
        assert engine.step_stats[-1][1].grammar_queue == 0
        _idle(engine)


# ---- lock-step ----


def test_debug_lockstep_with_grammars(model: str, eos: int, boom: None) -> None:
    """Every collective checked across ranks at (2, 2): grammars of every kind, plain requests,
    a failing grammar and a chunked prefill in one workload run clean."""
    kinds = list(GRAMMARS) * 2
    with _engine(model, 2, 2, debug_lockstep=True, chunked_prefill_size=16) as engine:
        outs = engine.generate(
            prompt=[LONG_PROMPT, *PROMPTS, *PROMPTS[:2]],
            sampling_params=[
                {"max_new_tokens": 120, "temperature": 1.0, "seed": i, k: GRAMMARS[k]}
                for i, k in enumerate(kinds)
            ]
            + [_plain()],
        )
        for kind, out in zip(kinds, outs):
            _check_done(out, kind, eos)
        _fails_with_400(engine, PROMPTS[0], {"max_new_tokens": 8, "regex": "boom"}, "boom")
        _serves_after(engine)
