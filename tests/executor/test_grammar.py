"""Constrained decoding's rank-side pieces (executor/grammar.py): the CPU bitmask against
xgrammar's own kernel and a plain loop, the per-step MaskFill's row mapping, sampling under masks
(tokens allowed, logprobs the model's own) and the frontend's check. The backend's lifecycle:
test_grammar_backend.py."""

from __future__ import annotations

import json
import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
import xgrammar as xgr
from grammar_util import DIGITS, EOS, tiny_backend, wait_status

import dpattn.executor.grammar as G
from dpattn.executor.grammar import (
    GrammarStatus,
    MaskFill,
    apply_bitmask,
    check_grammar,
    fill_bitmask,
)
from dpattn.executor.sampling_params import SamplingParams
from dpattn.models.tiny import make_tokenizer
from dpattn.scheduler.schedule_batch import Req, sample_requests


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return make_tokenizer()


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
    backend = tiny_backend(tokenizer)
    for key in [DIGITS, ("ebnf", 'root ::= "yes" | "no"')]:
        backend.submit(key)
        assert wait_status(backend, key)[0] == GrammarStatus.READY
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
