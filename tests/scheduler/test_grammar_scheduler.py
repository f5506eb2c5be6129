"""Constrained decoding through the Engine (thread backend, the tiny default model): outputs that
always parse, rows without a grammar untouched, logprobs the model's own, and the scheduler's
paths (chunked prefill, prefix cache, n > 1, retraction) under grammars. Failures, agreement,
aborts and lock-step: test_grammar_failures.py; the pieces: executor/test_grammar*.py."""

from __future__ import annotations

import math
import re

import pytest
from grammar_engines import (
    FORCED_PROMPT,
    GRAMMARS,
    LAYOUTS,
    LETTERS,
    LONG_PROMPT,
    PROMPTS,
    assert_idle,
    check_done,
    plain_params,
    thread_engine,
)

from dpattn.models.tiny import TOKENIZER_VOCAB_SIZE, make_tiny_model

pytestmark = pytest.mark.timeout(120)  # an agreement bug hangs: fail instead

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
    with thread_engine(model, tp, dp) as engine:
        outs = engine.generate(
            prompt=[p for _, p, _ in items] + PROMPTS[:2],
            sampling_params=params + [plain_params()] * 2,
        )
        for (kind, _, _), out in zip(items, outs):
            check_done(out, kind, eos)
        assert all(len(o["output_ids"]) == 12 for o in outs[len(items) :])
        texts = {
            kind: {o["text"] for (k, _, _), o in zip(items, outs) if k == kind} for kind in GRAMMARS
        }
        assert all(len(t) > 1 for t in texts.values()), texts  # the seeds sampled, not one path
        stats = [s for _, s in engine.step_stats]
        assert max(s.constrained for s in stats) > 0
        assert sum(s.grammar_s for s in stats) > 0
        assert_idle(engine)


def test_padded_vocabulary(tmp_path_factory: pytest.TempPathFactory, eos: int) -> None:
    """A model vocabulary past the tokenizer's, not a multiple of 32, split over attn_tp 2
    (vocab-parallel head, padded shards): the ids past the tokenizer are never sampled under a
    grammar, though the unconstrained model samples them."""
    vocab = TOKENIZER_VOCAB_SIZE + 5
    path = make_tiny_model("llama", tmp_path_factory.mktemp("padded") / "llama", vocab_size=vocab)
    with thread_engine(str(path), 2, 1) as engine:
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
            check_done(out, text if text == LETTERS else kind, eos)
            assert max(out["output_ids"]) < TOKENIZER_VOCAB_SIZE
        assert_idle(engine)


# ---- rows without a grammar, and logprobs ----


@pytest.mark.parametrize("tp,dp", LAYOUTS)
def test_rows_without_grammar_untouched(model: str, tp: int, dp: int) -> None:
    """Greedy outputs of unconstrained requests are token-equal with and without constrained
    batch-mates (interleaved, so the constrained rows sit at every position of the batch)."""
    with thread_engine(model, tp, dp) as engine:
        ref = engine.generate(prompt=PROMPTS, sampling_params=plain_params(16))
        prompts, params = [], []
        for i, p in enumerate(PROMPTS):
            prompts += [PROMPTS[-1 - i], p]
            params += [{"max_new_tokens": 48, "temperature": 1.0, "seed": i, "regex": LETTERS}]
            params += [plain_params(16)]
        mixed = engine.generate(prompt=prompts, sampling_params=params)
        assert [o["output_ids"] for o in mixed[1::2]] == [o["output_ids"] for o in ref]
        for o in mixed[0::2]:  # the constrained ones were constrained all along
            assert re.fullmatch(LETTERS, o["text"]), o["text"]
        assert_idle(engine)


@pytest.mark.parametrize("tp,dp", LAYOUTS)
def test_constrained_logprobs_are_the_models_own(model: str, eos: int, tp: int, dp: int) -> None:
    with thread_engine(model, tp, dp) as engine:
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
        free = engine.generate(input_ids=ids, sampling_params=plain_params(10), return_logprob=True)
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
        assert_idle(engine)


# ---- the scheduler's paths under grammars ----


@pytest.mark.parametrize("tp,dp", LAYOUTS)
def test_chunked_prefill_and_prefix_cache(model: str, eos: int, tp: int, dp: int) -> None:
    """A long prompt prefilled in 8-token chunks, then the same prompt again (served from the
    prefix cache): greedy outputs equal the unchunked, uncached run's, and valid."""
    params = [{"max_new_tokens": 120, "temperature": 0, k: GRAMMARS[k]} for k in GRAMMARS]
    with thread_engine(model, tp, dp, disable_radix_cache=True) as engine:
        ref = engine.generate(prompt=[LONG_PROMPT] * 3, sampling_params=params)
    for out, kind in zip(ref, GRAMMARS):
        check_done(out, kind, eos)
    with thread_engine(model, tp, dp, chunked_prefill_size=8) as engine:
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
        assert_idle(engine)


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
    with thread_engine(model, tp, dp) as engine:
        together = engine.generate(
            prompt=[PROMPTS[0]] * len(seeds), sampling_params=params, dp_rank=0
        )
        for out in together:
            check_done(out, "json_schema", eos)
        assert len({o["text"] for o in together}) > 1
        for p, out in zip(params, together):
            alone = engine.generate(prompt=PROMPTS[0], sampling_params=p)
            assert alone["output_ids"] == out["output_ids"]
        assert_idle(engine)


@pytest.mark.parametrize("tp,dp", LAYOUTS)
def test_retraction_keeps_grammar_state(model: str, eos: int, tp: int, dp: int) -> None:
    """A KV pool too small for every request at once: requests are retracted mid-grammar and
    re-prefilled; their greedy outputs equal the run without pressure, all valid."""
    prompts = [f"{i}{i} " + LONG_PROMPT[:70] for i in range(3 * dp)]  # no shared prefix
    params = {"max_new_tokens": 50, "temperature": 0, "regex": LETTERS}
    with thread_engine(model, tp, dp) as engine:
        ref = engine.generate(prompt=prompts, sampling_params=params)
        assert sum(engine.retractions) == 0
    with thread_engine(model, tp, dp, kv_pool_tokens=90) as engine:
        outs = engine.generate(prompt=prompts, sampling_params=params)
        assert all(r > 0 for r in engine.retractions), engine.retractions
        assert_idle(engine)
    for out, want in zip(outs, ref):
        check_done(out, LETTERS, eos)
        assert out["output_ids"] == want["output_ids"]
