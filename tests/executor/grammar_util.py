"""What the executor's grammar tests share: a tiny-tokenizer xgrammar backend and a wait for it."""

from __future__ import annotations

import time
from typing import Any

from dpattn.executor.grammar import GrammarStatus, XGrammarBackend

DIGITS = ("regex", "[0-9]{3}")
EOS = 1  # the tiny tokenizer's </s>


def tiny_backend(tokenizer: Any, vocab: int = 512, timeout_s: float = 30.0, **kw: Any) -> Any:
    return XGrammarBackend(lambda: tokenizer, vocab, {EOS}, timeout_s, **kw)


def wait_status(backend: Any, key: Any, waited_s: float = 0.0) -> tuple[GrammarStatus, str]:
    deadline = time.monotonic() + 30
    while True:
        status, why = backend.status(key, waited_s)
        if status != GrammarStatus.PENDING or time.monotonic() > deadline:
            return status, why
        time.sleep(0.005)
