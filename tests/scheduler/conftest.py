"""Fixtures of the scheduler tests: the tiny default model and its EOS id (grammar tests)."""

from __future__ import annotations

import pytest

from dpattn.models.tiny import ensure_default_model


@pytest.fixture(scope="module")
def model() -> str:
    return str(ensure_default_model())


@pytest.fixture(scope="module")
def eos(model: str) -> int:
    from transformers import AutoTokenizer

    return int(AutoTokenizer.from_pretrained(model).eos_token_id)
