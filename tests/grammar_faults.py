"""A grammar compile failure on every rank, for the tests of what the engine and the server do
with one (the ranks are threads of the test's process, so patching the class reaches them)."""

from __future__ import annotations

from typing import Any

import pytest

from dpattn.executor.grammar import XGrammarBackend

MARKER = "boom"  # a grammar whose text holds it fails to compile
REASON = "the compiler went boom"  # what the failure says, as the client should see it


def fail_compiles(monkeypatch: pytest.MonkeyPatch) -> str:
    """Every compile of a grammar whose text holds MARKER raises; returns the reason."""
    compile_ = XGrammarBackend._compile

    def failing(self: XGrammarBackend, key: tuple[str, str]) -> Any:
        if MARKER in key[1]:
            raise RuntimeError(f"[12:00:00] /xgrammar/compiler.cc:1: {REASON}")
        return compile_(self, key)

    monkeypatch.setattr(XGrammarBackend, "_compile", failing)
    return REASON
