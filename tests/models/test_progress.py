"""GGUF conversion feedback (issue 12): every phase shows its name and a ticking elapsed time,
then how long it took; where stderr is not a terminal (issue 26), a few plain lines instead of
a repainted one. Tokens GGUF calls user-defined can be flagged special."""

from __future__ import annotations

import io
import time

from dpattn.models.gguf_convert import mark_special
from dpattn.models.progress import REFRESH_S, counted, phase
from dpattn.models.tiny import make_tokenizer


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_phase_ticks_then_reports_its_duration() -> None:
    out = Terminal()
    with phase("dpattn: reading the GGUF config", file=out):
        time.sleep(3 * REFRESH_S)
    text = out.getvalue()
    ticks = [t for t in text.split("\r") if t.startswith("dpattn: reading the GGUF config: 00:0")]
    assert len(ticks) >= 2, text  # shown at the start and refreshed while the body runs
    assert "dpattn: reading the GGUF config: done in" in text


def test_not_a_terminal_gets_lines_not_a_repainted_bar() -> None:
    """A pipe or a log file: each phase a start and a done line, a counted loop a line per
    quarter; no carriage return, whatever the duration (was ~100 repaints, 24 KB, per run)."""
    out = io.StringIO()
    with phase("dpattn: reading the GGUF config", file=out):
        time.sleep(3 * REFRESH_S)
    assert sum(1 for _ in counted(range(236), "dpattn: dequantizing GGUF tensors", file=out)) == 236
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text, repr(text)
    lines = text.splitlines()
    assert lines[:2] == ["dpattn: reading the GGUF config ...", lines[1]]
    assert lines[1].startswith("dpattn: reading the GGUF config: done in ")
    assert lines[2] == "dpattn: dequantizing GGUF tensors: 0/236 ..."
    assert [line.split(",")[0] for line in lines[3:6]] == [
        f"dpattn: dequantizing GGUF tensors: {n}/236" for n in (59, 118, 177)
    ]
    assert lines[6].startswith("dpattn: dequantizing GGUF tensors: done in ") and len(lines) == 7
    bar = Terminal()  # a terminal keeps tqdm's bar
    assert list(counted([1, 2], "x", file=bar)) == [1, 2] and "\r" in bar.getvalue()


def test_phase_can_be_silent() -> None:
    out = io.StringIO()
    with phase("quiet", enabled=False, file=out):
        pass
    assert list(counted([1, 2], "quiet", enabled=False, file=out)) == [1, 2]
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
