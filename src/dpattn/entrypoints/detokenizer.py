"""Incremental detokenization for streaming, and per-token text / bytes for logprobs."""

from __future__ import annotations

import functools
from typing import Any

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Text of a growing list of token ids, released only where it can no longer change.

    Each call decodes only a window of ids: the tokens since the last stable point plus the few
    before it (`prefix_offset`), whose text is subtracted, so word-initial spaces and byte-level
    merges come out as in a full decode, at O(new tokens) per call. Text ending in U+FFFD (a
    multi-byte character whose remaining bytes have not arrived) is not stable yet, and text
    that may be the start of a stop string is held back. `finish` decodes everything once and
    releases the rest, cut at the matched stop string as `Engine.result` does, so the
    concatenation of all releases equals the non-streamed text.
    """

    def __init__(
        self, tokenizer: Any, stop: list[str] | None = None, skip_special_tokens: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = list(stop or [])
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""  # text of ids[:read_offset], stable
        self.prefix_offset = 0  # context tokens decoded in front of the window
        self.read_offset = 0
        self.sent = 0  # characters released

    def _decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, new_ids: list[int]) -> str:
        self.ids += new_ids
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        window = self._decode(self.ids[self.prefix_offset :])
        if len(window) > len(prefix) and not window.endswith(REPLACEMENT):
            self.text += window[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        text, end = self.text, len(self.text)
        for s in self.stop:  # a whole stop string: the text ends before it
            found = text.find(s, max(0, self.sent - len(s)), end)
            if found != -1:
                end = found
        hold = 0
        for s in self.stop:  # the longest tail that could still grow into a stop string
            for k in range(min(len(s) - 1, end), hold, -1):
                if text.endswith(s[:k], 0, end):
                    hold = k
                    break
        end -= hold
        if end <= self.sent:
            return ""
        out, self.sent = text[self.sent : end], end
        return out

    def finish(self, matched_stop: str | int | None = None) -> str:
        text = self._decode(self.ids)
        if matched_stop in self.stop and matched_stop in text:  # none held: no_stop_trim
            text = text[: text.index(matched_stop)]
        out, self.sent = text[self.sent :], max(self.sent, len(text))
        return out


@functools.lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of the GPT-2 byte-level alphabet (byte -> printable character)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += range(ord("®"), ord("ÿ") + 1)
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id]) if tokenizer is not None else ""


def token_bytes(tokenizer: Any, token_id: int) -> list[int]:
    """The token's raw bytes (byte-level BPE pieces map back exactly; else its UTF-8 text)."""
    if tokenizer is None:
        return []
    piece = tokenizer.convert_ids_to_tokens(token_id)
    table = _unicode_to_byte()
    if isinstance(piece, str) and piece and all(ch in table for ch in piece):
        return [table[ch] for ch in piece]
    return list(token_text(tokenizer, token_id).encode())
