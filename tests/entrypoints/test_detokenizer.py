"""Incremental detokenization (no server): streamed pieces never split a character."""

from __future__ import annotations

import random

from dpattn.entrypoints.detokenizer import IncrementalDetokenizer
from dpattn.models.tiny import make_tokenizer


def test_incremental_detokenizer_never_splits_characters() -> None:
    tok = make_tokenizer()
    text = "héllo €😀 wörld — naïve café, the end"
    detok = IncrementalDetokenizer(tok)
    parts = [detok.add([i]) for i in tok.encode(text)] + [detok.finish()]
    assert "".join(parts) == text
    assert not any("\ufffd" in p for p in parts)
    rng = random.Random(0)  # any id sequence, invalid UTF-8 included, reassembles exactly
    for _ in range(40):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 30))]
        stop = [rng.choice(["e", "th", "\ufffd", "lo w"])]
        detok = IncrementalDetokenizer(tok, stop)
        streamed = "".join(detok.add([i]) for i in ids)
        full = tok.decode(ids, skip_special_tokens=True)
        matched = stop[0] if stop[0] in full else None
        streamed += detok.finish(matched)
        assert streamed == (full[: full.index(matched)] if matched else full)
