"""The KV pool's size (issue 11, item 2): fixed, or a fraction of the memory left, capped at what
the running requests could ever use."""

from __future__ import annotations

import pytest
import torch

from dpattn.kvcache.budget import available_memory, bytes_per_token, kv_budget

CPU = torch.device("cpu")


def test_bytes_per_token_counts_k_and_v_of_every_layer() -> None:
    assert bytes_per_token(2, 2, 16, torch.float32) == 2 * 2 * 2 * 16 * 4
    assert bytes_per_token(18, 1, 256, torch.bfloat16) == 2 * 18 * 256 * 2


def test_fixed_size_wins() -> None:
    b = kv_budget(100, 0.5, 512, CPU, 4, 10**9)
    assert (b.tokens, b.source) == (100, "--max-total-tokens")
    with pytest.raises(ValueError, match="max_total_tokens must be >= 2"):
        kv_budget(1, None, 512, CPU, 1, 10**9)


def test_fraction_of_available_memory_split_between_ranks() -> None:
    per_token = 2**20  # 1 MiB a token: the uncapped size stays small
    b = kv_budget(None, 0.01, per_token, CPU, 2, 10**12)
    expected = 0.01 * available_memory(CPU) / 2 / per_token
    assert abs(b.tokens - expected) <= 0.05 * expected + 1
    assert "mem_fraction_static=0.01" in b.source and "2 rank(s)" in b.source


def test_capped_at_useful_tokens_and_refused_without_memory() -> None:
    b = kv_budget(None, 0.5, 64, CPU, 1, 1000)
    assert b.tokens == 1000 and "capped" in b.source
    with pytest.raises(ValueError, match="no memory left for the KV cache"):
        kv_budget(None, 1e-9, 2**30, CPU, 1, 10**9)
    with pytest.raises(ValueError, match=r"mem_fraction_static must be in \(0, 1\]"):
        kv_budget(None, 1.5, 64, CPU, 1, 10**9)
