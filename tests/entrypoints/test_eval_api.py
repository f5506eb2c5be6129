"""The evaluation API over HTTP: completions echo + logprobs N (how lm-eval scores), max_tokens 0,
chat top_logprobs, /generate's SGLang logprob names, /tokenize and /detokenize; every value equals
transformers' log_softmax, and the official `openai` client parses every field."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest
import torch
from server_harness import MODEL, ServerThread

from dpattn.tools.verify import reference_logits

PROMPT = [5, 9, 200, 31, 77, 8, 1]
SEQ: list[int] = []  # PROMPT + its greedy next token (set by the lsm fixture)


@pytest.fixture(scope="module")
def lsm(server: ServerThread) -> torch.Tensor:
    """transformers' log_softmax over PROMPT + the greedy continuation."""
    out = server.state.engine.generate(
        input_ids=PROMPT, sampling_params={"max_new_tokens": 1, "temperature": 0}
    )
    SEQ[:] = PROMPT + out["output_ids"]  # type: ignore[call-overload]
    model = server.state.engine.cfg.model_path
    return torch.log_softmax(reference_logits(model, "float32", {0: SEQ})[0], dim=-1)


def test_completions_echo_scores_the_prompt(client: openai.OpenAI, lsm: torch.Tensor) -> None:
    kw: dict[str, Any] = dict(model=MODEL, prompt=[PROMPT], echo=True, logprobs=2, temperature=0)
    for max_tokens in (1, 0):
        r = client.completions.create(**kw, max_tokens=max_tokens)
        lp = r.choices[0].logprobs
        assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
        n = len(PROMPT) + max_tokens
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == n  # type: ignore[arg-type]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        want = [float(lsm[p - 1, SEQ[p]]) for p in range(1, n)]
        assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
        for p in range(1, n):
            best = lsm[p - 1].topk(2)
            assert sorted(lp.top_logprobs[p].values(), reverse=True) == pytest.approx(
                best.values.tolist(), abs=1e-4
            )
        assert r.choices[0].text.startswith(r.choices[0].text[: len(lp.tokens[0])])
        assert r.usage is not None and r.usage.completion_tokens == max_tokens
    stream = client.completions.create(**kw, max_tokens=1, stream=True)
    chunks = list(stream)
    streamed = [x for c in chunks for x in (c.choices[0].logprobs.token_logprobs or [])]  # type: ignore[union-attr]
    want = [float(lsm[p - 1, SEQ[p]]) for p in range(1, len(SEQ))]
    assert streamed[0] is None and streamed[1:] == pytest.approx(want, abs=1e-4)


def test_chat_top_logprobs(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    r = client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.top_logprobs[0].logprob == pytest.approx(t.logprob) for t in content)  # greedy
    stream = client.chat.completions.create(**kw, stream=True)
    streamed = [
        t
        for c in stream
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content or []
    ]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    assert all(len(t.top_logprobs) == 3 for t in streamed)


def test_native_generate_logprob_names(server: ServerThread, lsm: torch.Tensor) -> None:
    body = {
        "input_ids": PROMPT,
        "sampling_params": {"max_new_tokens": 1, "temperature": 0},
        "return_logprob": True,
        "logprob_start_len": 2,
        "top_logprobs_num": 2,
    }
    meta = httpx.post(server.url + "/generate", json=body, timeout=60).json()["meta_info"]
    inputs = meta["input_token_logprobs"]
    assert [t for _, t, _ in inputs] == PROMPT[2:]  # [logprob, id, text or null]
    want = [float(lsm[p - 1, PROMPT[p]]) for p in range(2, len(PROMPT))]
    assert [lp for lp, _, _ in inputs] == pytest.approx(want, abs=1e-4)
    assert len(meta["input_top_logprobs"]) == len(PROMPT) - 2
    assert len(meta["output_top_logprobs"][0]) == 2


def test_tokenize_routes(server: ServerThread) -> None:
    if server.state.tokenizer is None:
        pytest.skip("no tokenizer")
    r = httpx.post(server.url + "/tokenize", json={"prompt": "hello world"}).json()
    assert r["count"] == len(r["tokens"]) > 0 and r["max_model_len"] == server.state.context_length
    back = httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"]}).json()
    assert "hello world" in back["prompt"]
    bad = httpx.post(server.url + "/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400
    models = httpx.get(server.url + "/v1/models").json()["data"][0]
    assert models["max_model_len"] == server.state.context_length


def test_logit_bias(client: openai.OpenAI, server: ServerThread, lsm: torch.Tensor) -> None:
    forced = 7
    assert SEQ[len(PROMPT)] != forced  # greedy alone would not pick it: only the bias can
    r = client.completions.create(
        model=MODEL,
        prompt=[PROMPT],
        max_tokens=3,
        temperature=0,
        logprobs=0,
        logit_bias={str(forced): 100},
    )
    lp = r.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None
    assert lp.tokens == [server.state.tokenizer.decode([forced])] * 3
    # the forced token's logprob is the model's own (unbiased)
    assert lp.token_logprobs[0] == pytest.approx(float(lsm[len(PROMPT) - 1, forced]), abs=1e-4)
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(model=MODEL, prompt="x", logit_bias={"99999999": 1})
