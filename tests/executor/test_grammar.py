"""Constrained decoding's rank-side pieces (executor/grammar.py): the CPU bitmask against
xgrammar's own kernel and a plain loop, the per-step MaskFill's row mapping, sampling under masks
(tokens allowed, logprobs the model's own), the frontend's check, and the xgrammar backend's
status transitions (pending, ready, timed out, failed, cached, evicted) and the "none" backend."""

from __future__ import annotations

import json
import math
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
import xgrammar as xgr

import dpattn.executor.grammar as G
from dpattn.executor.grammar import (
    GrammarStatus,
    MaskFill,
    NoGrammarBackend,
    XGrammarBackend,
    apply_bitmask,
    check_grammar,
    fill_bitmask,
    json_schema_grammar,
    make_backend,
)
from dpattn.executor.sampling_params import SamplingParams
from dpattn.models.tiny import make_tokenizer
from dpattn.scheduler.schedule_batch import Req, sample_requests

DIGITS = ("regex", "[0-9]{3}")
EOS = 1  # the tiny tokenizer's </s>


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return make_tokenizer()


def _backend(tokenizer: Any, vocab: int = 512, timeout_s: float = 30.0, **kw: Any) -> Any:
    return XGrammarBackend(lambda: tokenizer, vocab, {EOS}, timeout_s, **kw)


def _wait_status(backend: Any, key: Any, waited_s: float = 0.0) -> tuple[GrammarStatus, str]:
    deadline = time.monotonic() + 30
    while True:
        status, why = backend.status(key, waited_s)
        if status != GrammarStatus.PENDING or time.monotonic() > deadline:
            return status, why
        time.sleep(0.005)


def _naive(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """The bitmask's definition, one token at a time: bit j of word w allows token 32 w + j."""
    out = logits.clone()
    words = bitmask.tolist()
    n = min(logits.shape[1], bitmask.shape[1] * 32)
    for i in rows:
        for t in range(n):
            if not (words[i][t // 32] >> (t % 32)) & 1:
                out[i, t] = -math.inf
    return out


# ---- apply_bitmask ----


@pytest.mark.parametrize(
    "vocab,words",
    [
        (32, 1),
        (100, 4),  # not a multiple of 32: the last word's high bits lie past the vocabulary
        (517, 17),
        (600, 17),  # logits wider than the bitmask: the columns past it stay as they are
        (500, 17),  # bitmask wider than the logits
    ],
)
@pytest.mark.parametrize("batch", [1, 5])
def test_apply_bitmask_matches_xgrammar(vocab: int, words: int, batch: int) -> None:
    g = torch.Generator().manual_seed(vocab * 10 + batch)
    selections = {
        "all": list(range(batch)),
        "first": [0],
        "last": [batch - 1],
        "even": list(range(0, batch, 2)),
        "odd": list(range(1, batch, 2)),
        "none": [],
    }
    for name, rows in selections.items():
        logits = torch.randn(batch, vocab, generator=g)
        logits[0, 3] = -math.inf  # an already forbidden token stays forbidden
        bitmask = torch.randint(-(2**31), 2**31 - 1, (batch, words), dtype=torch.int32, generator=g)
        bitmask[0, 0] = -1  # a word allowing all, one allowing none
        bitmask[-1, -1] = 0
        ours, theirs = logits.clone(), logits.clone()
        apply_bitmask(ours, bitmask, rows)
        if rows:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # xgrammar warns where the widths differ
                xgr.apply_token_bitmask_inplace(theirs, bitmask, indices=rows)
        assert torch.equal(ours, theirs), (name, rows)
        assert torch.equal(ours, _naive(logits, bitmask, rows)), (name, rows)
        untouched = [i for i in range(batch) if i not in rows]
        assert torch.equal(ours[untouched], logits[untouched]), name  # bit-identical


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (xgrammar's GPU kernel)")
def test_apply_bitmask_on_cuda() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 517, generator=g)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (5, 17), dtype=torch.int32, generator=g)
    for rows in ([0, 2, 4], list(range(5))):
        on_gpu = logits.cuda()
        apply_bitmask(on_gpu, bitmask, rows)  # the bitmask stays on the host, as filled
        assert torch.equal(on_gpu.cpu(), _naive(logits, bitmask, rows)), rows


def test_apply_bitmask_on_inference_tensors() -> None:
    """The forward's logits are inference tensors; masking them in place must work."""
    with torch.inference_mode():
        logits = torch.randn(3, 100)
    bitmask = torch.zeros(3, 4, dtype=torch.int32)
    bitmask[:, 0] = 0b1010
    with torch.inference_mode():
        apply_bitmask(logits, bitmask, [1])
    assert torch.isfinite(logits[1]).tolist() == [i in (1, 3) for i in range(100)]
    assert torch.isfinite(logits[[0, 2]]).all()


# ---- MaskFill, fill_bitmask, sample_requests with real matchers ----


@pytest.fixture(scope="module")
def ready_backend(tokenizer: Any) -> Any:
    backend = _backend(tokenizer)
    for key in [DIGITS, ("ebnf", 'root ::= "yes" | "no"')]:
        backend.submit(key)
        assert _wait_status(backend, key)[0] == GrammarStatus.READY
    yield backend
    backend.close()


def _allowed(backend: Any, matcher: Any) -> set[int]:
    bm = backend.allocate_bitmask(1)
    matcher.fill_next_token_bitmask(bm, 0)
    logits = torch.zeros(1, 512)
    apply_bitmask(logits, bm, [0])
    return set(torch.isfinite(logits[0]).nonzero().flatten().tolist())


def test_matchers_allow_what_the_grammar_allows(ready_backend: Any, tokenizer: Any) -> None:
    digits = _allowed(ready_backend, ready_backend.matcher(DIGITS))
    assert digits and EOS not in digits
    assert all(tokenizer.decode([t]).isdigit() for t in digits)
    # Every single-digit token is allowed at the start.
    assert {tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)} <= digits
    yes_no = ready_backend.matcher(("ebnf", 'root ::= "yes" | "no"'))
    first = _allowed(ready_backend, yes_no)
    assert {tokenizer.decode([t]) for t in first} <= {"y", "ye", "yes", "n", "no"}
    # A matcher is fresh each time: one that accepted tokens does not move another.
    m1, m2 = ready_backend.matcher(DIGITS), ready_backend.matcher(DIGITS)
    one = tokenizer.convert_tokens_to_ids("1")
    for _ in range(3):
        assert m1.accept_token(one)
    assert _allowed(ready_backend, m1) == {EOS}
    assert not m1.is_terminated()
    assert m1.accept_token(EOS) and m1.is_terminated()
    assert _allowed(ready_backend, m2) == digits


def test_mask_fill_maps_sampled_rows_to_batch_rows(ready_backend: Any) -> None:
    """Batch rows 0..3; row 0 is a prefill chunk that does not sample (so the logits have rows
    1..3 only), rows 1 and 3 carry no grammar: only logits row 1 (batch row 2) is masked."""
    matchers = [ready_backend.matcher(DIGITS), None, ready_backend.matcher(DIGITS), None]
    allowed = _allowed(ready_backend, ready_backend.matcher(DIGITS))
    pool = ThreadPoolExecutor(1)
    try:
        assert fill_bitmask(ready_backend.allocate_bitmask(4), matchers) == [0, 2]
        fill = MaskFill(pool, ready_backend, matchers)
        logits = torch.randn(3, 512)
        before = logits.clone()
        stats = fill.apply(logits, [1, 2, 3])
        assert stats["constrained"] == 1 and stats["grammar_s"] >= 0
        assert torch.equal(logits[[0, 2]], before[[0, 2]])
        assert set(torch.isfinite(logits[1]).nonzero().flatten().tolist()) == allowed
        # All rows sampled: the bitmask is used as is.
        fill = MaskFill(pool, ready_backend, matchers)
        logits = torch.randn(4, 512)
        before = logits.clone()
        assert fill.apply(logits, [0, 1, 2, 3])["constrained"] == 2
        assert torch.equal(logits[[1, 3]], before[[1, 3]])
        for i in (0, 2):
            assert set(torch.isfinite(logits[i]).nonzero().flatten().tolist()) == allowed
    finally:
        pool.shutdown()


@pytest.mark.parametrize("return_logprob", [True, False])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sample_requests_tokens_allowed_logprobs_unmasked(
    ready_backend: Any, return_logprob: bool, temperature: float
) -> None:
    grammars = [DIGITS, None, DIGITS, None, DIGITS]
    reqs = []
    for i, key in enumerate(grammars):
        params = SamplingParams(max_new_tokens=4, temperature=temperature)
        req = Req(f"r{i}", [5, 6], params, seed=i, return_logprob=return_logprob)
        req.top_logprobs_num = 2 if return_logprob else 0
        req.grammar = ready_backend.matcher(key) if key else None
        reqs.append(req)
    allowed = _allowed(ready_backend, ready_backend.matcher(DIGITS))
    pool = ThreadPoolExecutor(1)
    try:
        for trial in range(5):
            g = torch.Generator().manual_seed(trial)
            logits = torch.randn(5, 512, generator=g) * 3
            raw = logits.clone()
            masks = MaskFill(pool, ready_backend, [r.grammar for r in reqs])
            tokens, logprobs, tops, stats = sample_requests(reqs, logits, masks, list(range(5)))
            assert stats["constrained"] == 3
            for i, (req, tok) in enumerate(zip(reqs, tokens)):
                if req.grammar is not None:
                    assert tok in allowed
                elif temperature == 0:
                    assert tok == int(raw[i].argmax())  # a row without a grammar: as ever
            if return_logprob:
                lsm = torch.log_softmax(raw, -1)
                assert logprobs == pytest.approx([float(lsm[i, t]) for i, t in enumerate(tokens)])
                for i, top in enumerate(tops):  # the model's own best, allowed or not
                    vals, ids = lsm[i].topk(2)
                    assert [t for _, t in top] == ids.tolist()
                assert torch.equal(logits, raw)  # masked on a copy
            if temperature == 0:
                best = [max(allowed, key=lambda t, i=i: float(raw[i, t])) for i in (0, 2, 4)]
                assert [tokens[i] for i in (0, 2, 4)] == best
            for req in reqs:  # new matchers for the next trial
                req.grammar = ready_backend.matcher(DIGITS) if req.grammar else None
    finally:
        pool.shutdown()


# ---- check_grammar ----


@pytest.mark.parametrize(
    "kind,text,words",
    [
        ("json_schema", "{", "Expecting property name"),
        ("json_schema", '{"type": "nonsense"}', "nonsense"),
        ("json_schema", "[1]", "object or bool"),
        ("json_schema", '{"properties": {"a": {"$ref": "#/nope"}}}', "nope"),
        ("regex", "(", "parenthesis"),
        ("regex", "[a-", "["),
        ("ebnf", "root ::= ", "EBNF"),
        ("ebnf", 'foo ::= "a"', "root"),
        ("ebnf", "root ::= undefined_rule", "undefined_rule"),
    ],
)
def test_check_grammar_names_the_kind(kind: str, text: str, words: str) -> None:
    with pytest.raises(ValueError) as e:
        check_grammar(SamplingParams(**{kind: text}))
    msg = str(e.value)
    assert msg.startswith(f"{kind}: ") and words in msg, msg
    assert ".cc:" not in msg and not msg[len(kind) + 2 :].startswith("["), msg  # no C++ location


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(json_schema=json.dumps({"type": "object"})),
        SamplingParams(json_schema="true"),
        SamplingParams(regex=r"\d{4}-\d{2}"),
        SamplingParams(ebnf='root ::= "a" root | "b"'),
    ],
)
def test_check_grammar_accepts_valid(params: SamplingParams) -> None:
    check_grammar(params)


def test_reason_strips_the_cpp_location() -> None:
    e = RuntimeError("[12:00:00] /src/xgrammar/cpp/json.cc:42: something broke: badly")
    assert G._reason(e) == "something broke: badly"
    assert G._reason(ValueError("plain: message")) == "plain: message"


# ---- XGrammarBackend status transitions ----


class GatedBackend(XGrammarBackend):
    """Compiles only once its gate opens (or raises what ``fail`` holds); counts compiles."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.gate = threading.Event()
        self.fail: Exception | None = None
        self.compiles: list[tuple[str, str]] = []

    def _compile(self, key: Any) -> Any:
        self.compiles.append(key)
        assert self.gate.wait(20), "the test never opened the gate"
        if self.fail is not None:
            raise self.fail
        return super()._compile(key)


@pytest.fixture
def gated(tokenizer: Any) -> Any:
    backend = GatedBackend(lambda: tokenizer, 512, {EOS}, 0.2)
    yield backend
    backend.gate.set()  # never leave a pool thread waiting
    backend.close()


def test_pending_then_ready(gated: Any) -> None:
    gated.submit(DIGITS)
    assert gated.status(DIGITS, 0.0) == (GrammarStatus.PENDING, "")
    assert gated.status(DIGITS, 0.1) == (GrammarStatus.PENDING, "")  # within the timeout
    gated.gate.set()
    assert _wait_status(gated, DIGITS) == (GrammarStatus.READY, "")
    gated.submit(DIGITS)  # cached: not compiled again
    assert gated.status(DIGITS, 99.0) == (GrammarStatus.READY, "")  # ready beats the clock
    assert gated.compiles == [DIGITS]
    assert gated.matcher(DIGITS).accept_token(21)  # "1"


def test_timeout_fails_the_waiter_not_the_grammar(gated: Any) -> None:
    gated.submit(DIGITS)
    status, why = gated.status(DIGITS, 0.25)  # waited past the 0.2 s timeout
    assert status == GrammarStatus.FAILED
    assert "timed out" in why and "0.2" in why
    # A request that came later fails at once (no second wait for the same stuck compile), and
    # the stuck thread is replaced so that other grammars still compile.
    assert gated.status(DIGITS, 0.0)[0] == GrammarStatus.FAILED
    assert gated._pool.threads == 3
    gated.submit(DIGITS)
    assert gated.compiles == [DIGITS]
    gated.gate.set()  # it finishes after all: ready from then on
    gated._cache[DIGITS].result(timeout=30)
    assert gated.status(DIGITS, 0.0) == (GrammarStatus.READY, "")


def test_failed_compile_names_kind_and_reason_and_is_cached(gated: Any) -> None:
    key = ("json_schema", "{}")
    gated.fail = RuntimeError("[12:00:00] /x/compiler.cc:7: out of luck")
    gated.submit(key)
    gated.gate.set()
    assert _wait_status(gated, key) == (GrammarStatus.FAILED, "json_schema: out of luck")
    gated.submit(key)  # a repeated bad grammar fails fast, from the cache
    assert gated.status(key, 0.0) == (GrammarStatus.FAILED, "json_schema: out of luck")
    assert gated.compiles == [key]


def test_real_compile_failure(tokenizer: Any) -> None:
    """A grammar the frontend would have refused, sent to the backend anyway."""
    backend = _backend(tokenizer)
    try:
        for key, words in [(("regex", "("), "parenthesis"), (("ebnf", 'x ::= "a"'), "root")]:
            backend.submit(key)
            status, why = _wait_status(backend, key)
            assert status == GrammarStatus.FAILED
            assert why.startswith(f"{key[0]}: ") and words in why, why
    finally:
        backend.close()


def test_evicted_grammar_compiles_again(
    gated: Any, monkeypatch: pytest.MonkeyPatch, tokenizer: Any
) -> None:
    monkeypatch.setattr(G, "CACHE_SIZE", 2)
    gated.gate.set()
    keys = [("regex", "a"), ("regex", "b"), ("regex", "c")]
    for key in keys:
        gated.submit(key)
    assert list(gated._cache) == keys[1:]
    assert gated.status(keys[0], 0.0) == (GrammarStatus.PENDING, "")  # resubmitted
    assert _wait_status(gated, keys[0]) == (GrammarStatus.READY, "")
    gated.submit(keys[1])  # used: moves to the end, so "c" goes next
    gated.submit(("regex", "d"))
    assert ("regex", "c") not in gated._cache and keys[1] in gated._cache
    assert gated.compiles.count(keys[0]) == 2


def test_no_tokenizer_fails_every_grammar() -> None:
    backend = XGrammarBackend(lambda: None, 512, {EOS}, 30.0)
    try:
        backend.submit(DIGITS)
        status, why = _wait_status(backend, DIGITS)
        assert status == GrammarStatus.FAILED and "no tokenizer" in why
    finally:
        backend.close()


def test_close_does_not_wait_for_a_stuck_compile(gated: Any) -> None:
    gated.submit(DIGITS)
    gated.submit(("regex", "x"))
    gated.submit(("regex", "y"))  # queued behind two stuck compiles: cancelled
    t0 = time.monotonic()
    gated.close()
    assert time.monotonic() - t0 < 1.0


def test_padded_vocabulary(tokenizer: Any) -> None:
    """A model vocabulary larger than the tokenizer's (and not a multiple of 32): the ids
    past the tokenizer are never allowed."""
    backend = _backend(tokenizer, vocab=517)
    try:
        backend.submit(DIGITS)
        assert _wait_status(backend, DIGITS)[0] == GrammarStatus.READY
        bm = backend.allocate_bitmask(2)
        assert bm.shape == (2, 17)
        m = backend.matcher(DIGITS)
        for _ in range(3):
            m.fill_next_token_bitmask(bm, 1)
            logits = torch.zeros(2, 517)
            apply_bitmask(logits, bm, [1])
            allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
            assert allowed and max(allowed) < 512
            assert m.accept_token(allowed[0])
        m.fill_next_token_bitmask(bm, 1)
        logits = torch.zeros(2, 517)
        apply_bitmask(logits, bm, [1])
        assert torch.isfinite(logits[1]).nonzero().flatten().tolist() == [EOS]
    finally:
        backend.close()


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string"},
        # xgrammar 0.2.9 lowers a length-bounded string to [^"\\\r\n]{m,n}, which lets raw
        # control characters through (mlc-ai/xgrammar#800), and every string admits UTF-8
        # surrogates (three U+FFFD once decoded); the backend narrows the class.
        {"type": "string", "maxLength": 2},
        {"type": "object", "properties": {"s": {"type": "string", "minLength": 1}}},
    ],
)
def test_json_strings_refuse_control_characters_and_surrogates(tokenizer: Any, schema: Any) -> None:
    key = ("json_schema", json.dumps(schema))
    backend = _backend(tokenizer)
    try:
        backend.submit(key)
        assert _wait_status(backend, key)[0] == GrammarStatus.READY
        m = backend.matcher(key)
        prefix = '{"s": "' if schema["type"] == "object" else '"'
        assert all(m.accept_token(t) for t in tokenizer.encode(prefix))
        nul = tokenizer.convert_tokens_to_ids("Ā")  # the byte-level token of byte 0x00
        assert tokenizer.decode([nul]) == "\x00"
        assert not m.accept_token(nul)
        assert m.accept_string(b"a") and not m.accept_string(b"\xed\xa0\x80")  # U+D800
        assert m.accept_string("é".encode())  # other non-ASCII characters stay allowed
    finally:
        backend.close()


# ---- NoGrammarBackend, make_backend ----


def test_no_grammar_backend(tokenizer: Any) -> None:
    backend = make_backend("none", lambda: tokenizer, 512, {EOS}, 30.0)
    assert isinstance(backend, NoGrammarBackend)
    backend.submit(DIGITS)
    status, why = backend.status(DIGITS, 0.0)
    assert status == GrammarStatus.FAILED and "--grammar-backend none" in why
    with pytest.raises(AssertionError):
        backend.matcher(DIGITS)
    backend.close()
    no_tok = make_backend("xgrammar", None, 512, {EOS}, 30.0)
    assert isinstance(no_tok, NoGrammarBackend)
    assert "no tokenizer" in no_tok.status(DIGITS, 0.0)[1]
    real = make_backend("xgrammar", lambda: tokenizer, 512, {EOS}, 30.0)
    assert isinstance(real, XGrammarBackend)
    real.close()
    with pytest.raises(ValueError, match="unknown grammar backend"):
        make_backend("outlines", lambda: tokenizer, 512, {EOS}, 30.0)


def test_status_order_is_agreement_order() -> None:
    """The DP group acts on the minimum: any rank's failure fails, all ready is ready."""
    assert GrammarStatus.FAILED < GrammarStatus.PENDING < GrammarStatus.READY
    assert min(GrammarStatus.READY, GrammarStatus.PENDING) == GrammarStatus.PENDING
    assert min(GrammarStatus.READY, GrammarStatus.FAILED) == GrammarStatus.FAILED


def test_json_schema_round_trip_keeps_latin1_escapes() -> None:
    """The fixed grammar goes through xgrammar's EBNF printer and parser, which write U+0080
    as "\\x80" and read "\\x800" back as U+0800 (found by the property test): the enum value
    U+0080 "0" must stay itself."""
    import xgrammar as xgr

    accepts = xgr.testing._is_grammar_accept_string
    grammar = json_schema_grammar(json.dumps({"enum": ["\x800", "\x80a0", "\\x41", "\u01010"]}))
    for value in ("\x800", "\x80a0", "\\x41", "\u01010"):
        assert accepts(grammar, json.dumps(value, ensure_ascii=False)), value
    for wrong in ("\u0800", "\u80a0"):
        assert not accepts(grammar, json.dumps(wrong, ensure_ascii=False)), wrong
