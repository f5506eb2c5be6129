"""Incremental detokenization for streaming, and per-token text / bytes for logprobs."""

from __future__ import annotations

import functools
from typing import Any

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Text of a growing list of token ids, released only where it can no longer change.

    Every call decodes all ids so far (byte-level BPE merges bytes across tokens) and releases
    only the new suffix that is stable: text ending in U+FFFD (a multi-byte character whose
    remaining bytes have not arrived) and text that may be the start of a stop string are held
    back. `finish` releases the rest, cut at the matched stop string as `Engine.result` does, so
    the concatenation of all releases equals the non-streamed text.
    """

    def __init__(self, tokenizer: Any, stop: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = list(stop or [])
        self.ids: list[int] = []
        self.sent = 0  # characters released

    def _decode(self) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def add(self, new_ids: list[int]) -> str:
        self.ids += new_ids
        text = self._decode()
        end = len(text)
        while end > self.sent and text[end - 1] == REPLACEMENT:
            end -= 1
        for s in self.stop:  # a whole stop string: the text ends before it
            found = text.find(s, 0, end)
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
        text = self._decode()
        if isinstance(matched_stop, str) and matched_stop in text:
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
