"""What a newcomer's first hour with the server touches (issue 12): the chat template chosen at
start-up, chat messages validated, special tokens skipped in text unless a request keeps them,
real `created` timestamps and the model card's dtype / layout, no `_created` metric series.

The tiny model's random weights draw its special tokens (<s>, </s>, <|im_start|>, ...) now and
then at temperature 1, which is what the skip test relies on, with fixed seeds.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import httpx
import openai
import pytest
from server_harness import MODEL, ServerThread

from dpattn.entrypoints.chat_template import BUILTIN, resolve_chat_template
from dpattn.entrypoints.detokenizer import IncrementalDetokenizer
from dpattn.entrypoints.openai_protocol import CompletionRequest
from dpattn.models.gguf_convert import FORMAT_VERSION, MARKER
from dpattn.models.tiny import SPECIAL_TOKENS, make_tokenizer

USER = {"role": "user", "content": "hi"}


# ---- chat template resolution ----
def test_tokenizer_template_is_kept_and_flag_overrides(tmp_path: Path) -> None:
    tok = make_tokenizer()
    own = resolve_chat_template(None, tok, str(tmp_path))
    assert own is not None and own.name == "tokenizer" and own.source == tok.chat_template
    gemma = resolve_chat_template("gemma", tok, str(tmp_path))
    assert gemma is not None and gemma.source == BUILTIN["gemma"][0]
    rendered = gemma.render(tok, [{"role": "system", "content": "Be brief."}, USER])
    assert rendered.endswith(
        "<start_of_turn>user\nBe brief.\n\nhi<end_of_turn>\n<start_of_turn>model\n"
    )
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}>")
    from_file = resolve_chat_template(str(path), tok, str(tmp_path))
    assert from_file is not None and from_file.render(tok, [USER]) == "[user]hi>"
    with pytest.raises(ValueError, match="neither a built-in"):
        resolve_chat_template("no-such-template", tok, str(tmp_path))


def test_packaged_base_gemma_gets_gemma_turns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A directory converted by gguf_convert (its marker) whose tokenizer has no template, as the
    # packaged Gemma 3 270M; any other template-less model has no chat.
    tok = make_tokenizer()
    tok.chat_template = None
    assert resolve_chat_template(None, tok, str(tmp_path)) is None
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / MARKER).write_text(json.dumps({"format_version": FORMAT_VERSION}))
    with caplog.at_level(logging.INFO):
        chat = resolve_chat_template(None, tok, str(tmp_path))
    assert chat is not None and chat.name == "gemma" and chat.stop_tokens == ("<end_of_turn>",)
    assert [r.getMessage() for r in caplog.records if "base model" in r.getMessage()]


# ---- chat messages ----
@pytest.mark.parametrize(
    "message,param",
    [
        ({"role": "wizard", "content": "x"}, "messages.0.role"),
        ({"role": "user"}, "messages.0.content"),
        ({"role": "user", "content": None}, "messages.0.content"),
    ],
)
def test_chat_messages_are_validated(server: ServerThread, message: dict, param: str) -> None:
    body = {"model": MODEL, "messages": [message], "max_tokens": 2}
    r = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


def test_every_known_role_is_accepted(client: openai.OpenAI) -> None:
    for role in ("system", "user", "assistant", "tool"):
        out = client.chat.completions.create(
            model=MODEL, messages=[{"role": role, "content": "x"}], max_tokens=2
        )
        assert out.choices[0].finish_reason == "length"


# ---- model card and metrics ----
def test_model_card_has_a_real_created_time_dtype_and_layout(
    server: ServerThread, client: openai.OpenAI
) -> None:
    card = client.models.list().data[0]
    assert 0 < time.time() - card.created < 3600
    assert client.models.retrieve(MODEL).created == card.created
    extra = card.model_dump()
    assert (extra["dtype"], extra["tp_size"], extra["dp_size"]) == ("float32", 2, 2)


def test_metrics_have_no_created_series(server: ServerThread, client: openai.OpenAI) -> None:
    client.completions.create(model=MODEL, prompt="x", max_tokens=2)
    text = httpx.get(server.url + "/metrics").text
    assert "dpattn_generation_tokens_total" in text
    assert "_created" not in text


# ---- special tokens ----
def test_special_tokens_skipped_by_default_kept_on_request(server: ServerThread) -> None:
    engine, tok = server.state.engine, server.state.tokenizer
    special = set(tok.all_special_ids)
    params = {"max_new_tokens": 48, "temperature": 1.0, "ignore_eos": True}
    outs = [
        engine.generate(input_ids=[7, 8, 9], sampling_params={**params, "seed": s})
        for s in range(8)
    ]
    hit = next(o for o in outs if special & set(o["output_ids"]))  # some seed draws one
    seed = outs.index(hit)
    assert hit["text"] == tok.decode(hit["output_ids"], skip_special_tokens=True)
    assert not any(t in hit["text"] for t in SPECIAL_TOKENS)
    keep = {**params, "seed": seed, "skip_special_tokens": False}
    kept = engine.generate(input_ids=[7, 8, 9], sampling_params=keep)
    assert kept["output_ids"] == hit["output_ids"]
    assert kept["text"] == tok.decode(kept["output_ids"], skip_special_tokens=False)
    assert any(t in kept["text"] for t in SPECIAL_TOKENS)
    # The OpenAI routes take the same switch (an extension, as vLLM / SGLang), streamed too.
    body = {
        "model": MODEL,
        "prompt": [7, 8, 9],
        "max_tokens": 48,
        "temperature": 1.0,
        "seed": seed,
        "ignore_eos": True,
    }
    for skip, expected in ((True, hit["text"]), (False, kept["text"])):
        r = httpx.post(
            server.url + "/v1/completions", json={**body, "skip_special_tokens": skip}, timeout=60
        )
        assert r.json()["choices"][0]["text"] == expected, (skip, r.text)


def test_request_field_maps_to_sampling_params() -> None:
    req = CompletionRequest.model_validate({"prompt": "x", "skip_special_tokens": False})
    assert req.sampling_dict(4, 0)["skip_special_tokens"] is False
    assert CompletionRequest.model_validate({"prompt": "x"}).sampling_dict(4, 0)[
        "skip_special_tokens"
    ]


def test_streaming_detokenizer_follows_the_switch() -> None:
    tok = make_tokenizer()
    ids = tok.encode("hello world") + [tok.eos_token_id] + tok.encode(" again")
    for skip in (True, False):
        detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
        text = "".join(detok.add([i]) for i in ids) + detok.finish()
        assert text == tok.decode(ids, skip_special_tokens=skip)
        assert ("</s>" in text) is not skip
