"""Sampling on its own: seeded draws are reproducible and the filters hold; SamplingParams
validates its fields."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from dpattn.executor.sampler import sample as sample_batch
from dpattn.executor.sampling_batch_info import SamplingBatchInfo
from dpattn.executor.sampling_params import SamplingParams


def sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    """One request's token through the batched sampler (a batch of one)."""
    info = SamplingBatchInfo.from_params([params], [gen], [False], [0])
    return int(sample_batch(logits[None], info).next_token_ids[0])


def test_sample_reproducible_and_filters() -> None:
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0, 1.0])
    hot = SamplingParams(temperature=1.0)
    draws = [
        [sample(logits, hot, gen) for _ in range(20)]
        for gen in (torch.Generator().manual_seed(1), torch.Generator().manual_seed(1))
    ]
    assert draws[0] == draws[1] and len(set(draws[0])) > 1
    gen = torch.Generator().manual_seed(0)
    assert {sample(logits, SamplingParams(top_k=2), gen) for _ in range(50)} <= {1, 2}
    assert {sample(logits, SamplingParams(top_p=0.01), gen) for _ in range(20)} == {1}
    assert {sample(logits, SamplingParams(min_p=0.95), gen) for _ in range(20)} <= {1, 2}
    assert sample(logits, SamplingParams(temperature=0), gen) == 1
    assert sample(logits, SamplingParams(top_k=1, temperature=5.0), gen) == 1


@pytest.mark.parametrize(
    "params,match",
    [
        ({"temprature": 0.5}, r"unknown sampling parameter\(s\) \['temprature'\]"),
        ({"max_new_tokens": -1}, "max_new_tokens must be an integer >= 1"),
        ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer >= 1"),
        ({"max_new_tokens": True}, "max_new_tokens must be an integer >= 1"),
        ({"temperature": -0.1}, "temperature must be"),
        ({"temperature": float("nan")}, "temperature must be"),
        ({"temperature": float("inf")}, "temperature must be"),
        ({"temperature": "hot"}, "temperature must be"),
        ({"top_p": 0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": 0}, "top_k must be -1 or >= 1"),
        ({"top_k": -2}, "top_k must be -1 or >= 1"),
        ({"min_p": 1.5}, r"min_p must be in \[0, 1\]"),
        ({"stop": [""]}, "stop must be"),
        ({"stop": 3}, "stop must be"),
        ({"stop_token_ids": 5}, "stop_token_ids must be"),
        ({"stop_token_ids": ["a"]}, "stop_token_ids must be"),
        ({"ignore_eos": "no"}, "ignore_eos must be"),
        ({"seed": 1.5}, "seed must be an integer"),
    ],
)
def test_sampling_params_validation(params: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SamplingParams.from_dict(params)


def test_sampling_params_from_dict_ok() -> None:
    p = SamplingParams.from_dict({"stop": "end", "temperature": 0, "seed": 3, "top_k": 1})
    assert p.stop == ["end"] and p.greedy and p.seed == 3
    assert SamplingParams.from_dict(None) == SamplingParams()
