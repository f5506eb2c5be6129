"""The per-request sampler the batched one replaced, kept as the tests' reference.

One token from one request's fp32 logits with torch.multinomial; filters in the order top-k,
top-p, min-p on softmax(logits / temperature)."""

from __future__ import annotations

import torch

from dpattn.executor.sampling_params import SamplingParams


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token from one request's fp32 logits [vocab]."""
    if params.greedy:
        return int(logits.argmax())
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_k > 0:
        kth = torch.topk(probs, min(params.top_k, probs.numel())).values[-1]
        probs = probs.masked_fill(probs < kth, 0)
    if params.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        drop = (
            sorted_p.cumsum(0) - sorted_p > params.top_p
        )  # keep the smallest prefix reaching top_p
        probs = probs.scatter(0, order, sorted_p.masked_fill(drop, 0))
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
