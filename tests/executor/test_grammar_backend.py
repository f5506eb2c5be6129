"""The xgrammar backend (executor/grammar.py): status transitions (pending, ready, timed out,
failed, cached, evicted), the vocabulary it masks, the JSON strings it compiles, and the "none"
backend."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
import torch
import xgrammar as xgr
from grammar_util import DIGITS, EOS, tiny_backend, wait_status

import dpattn.executor.grammar as G
from dpattn.executor.grammar import (
    GrammarStatus,
    NoGrammarBackend,
    XGrammarBackend,
    apply_bitmask,
    json_schema_grammar,
    make_backend,
)
from dpattn.models.tiny import make_tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return make_tokenizer()


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
    assert wait_status(gated, DIGITS) == (GrammarStatus.READY, "")
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
    assert wait_status(gated, key) == (GrammarStatus.FAILED, "json_schema: out of luck")
    gated.submit(key)  # a repeated bad grammar fails fast, from the cache
    assert gated.status(key, 0.0) == (GrammarStatus.FAILED, "json_schema: out of luck")
    assert gated.compiles == [key]


def test_real_compile_failure(tokenizer: Any) -> None:
    """A grammar the frontend would have refused, sent to the backend anyway."""
    backend = tiny_backend(tokenizer)
    try:
        for key, words in [(("regex", "("), "parenthesis"), (("ebnf", 'x ::= "a"'), "root")]:
            backend.submit(key)
            status, why = wait_status(backend, key)
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
    assert wait_status(gated, keys[0]) == (GrammarStatus.READY, "")
    gated.submit(keys[1])  # used: moves to the end, so "c" goes next
    gated.submit(("regex", "d"))
    assert ("regex", "c") not in gated._cache and keys[1] in gated._cache
    assert gated.compiles.count(keys[0]) == 2


def test_no_tokenizer_fails_every_grammar() -> None:
    backend = XGrammarBackend(lambda: None, 512, {EOS}, 30.0)
    try:
        backend.submit(DIGITS)
        status, why = wait_status(backend, DIGITS)
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
    backend = tiny_backend(tokenizer, vocab=517)
    try:
        backend.submit(DIGITS)
        assert wait_status(backend, DIGITS)[0] == GrammarStatus.READY
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
    backend = tiny_backend(tokenizer)
    try:
        backend.submit(key)
        assert wait_status(backend, key)[0] == GrammarStatus.READY
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

    accepts = xgr.testing._is_grammar_accept_string
    grammar = json_schema_grammar(json.dumps({"enum": ["\x800", "\x80a0", "\\x41", "\u01010"]}))
    for value in ("\x800", "\x80a0", "\\x41", "\u01010"):
        assert accepts(grammar, json.dumps(value, ensure_ascii=False)), value
    for wrong in ("\u0800", "\u80a0"):
        assert not accepts(grammar, json.dumps(wrong, ensure_ascii=False)), wrong
