"""GGUF conversion feedback (issue 12): every phase shows its name and a ticking elapsed time,
then how long it took; tokens GGUF calls user-defined can be flagged special."""

from __future__ import annotations

import io
import time

from dpattn.models.gguf_convert import mark_special
from dpattn.models.progress import REFRESH_S, phase
from dpattn.models.tiny import make_tokenizer


def test_phase_ticks_then_reports_its_duration() -> None:
    out = io.StringIO()
    with phase("dpattn: reading the GGUF config", file=out):
        time.sleep(3 * REFRESH_S)
    text = out.getvalue()
    ticks = [t for t in text.split("\r") if t.startswith("dpattn: reading the GGUF config: 00:0")]
    assert len(ticks) >= 2, text  # shown at the start and refreshed while the body runs
    assert "dpattn: reading the GGUF config: done in" in text


def test_phase_can_be_silent() -> None:
    out = io.StringIO()
    with phase("quiet", enabled=False, file=out):
        pass
    assert out.getvalue() == ""


def test_mark_special_drops_the_token_from_decoded_text() -> None:
    tok = make_tokenizer()
    tok.add_tokens(["<start_of_image>"])  # as GGUF's user-defined tokens arrive: not special
    ids = tok.encode("hello", add_special_tokens=False)
    marker = tok.convert_tokens_to_ids("<start_of_image>")
    assert "<start_of_image>" in tok.decode([*ids, marker], skip_special_tokens=True)
    mark_special(tok, ("<start_of_image>", "<not_in_vocab>"))
    assert tok.decode([*ids, marker], skip_special_tokens=True) == "hello"
    assert tok.convert_tokens_to_ids("<start_of_image>") == marker  # same id, flag only
