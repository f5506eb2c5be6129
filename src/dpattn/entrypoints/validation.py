"""Every check a request passes before it is sent to a rank, in one place.

A bad request must fail here, in the frontend, as a `ValueError` with the numbers (the server
turns it into a 400): on a rank it would stop the engine, or worse, behave differently per
layout (an id outside the vocabulary indexes past the embedding at A == 1 and lands in no shard,
i.e. zeros, at A > 1). The limits come from the ranks themselves (RankReady): the model's
vocabulary, not the tokenizer's length, and the effective context (bounded by the KV pool).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dpattn.executor.grammar import check_grammar
from dpattn.executor.sampling_params import SamplingParams


@dataclass(frozen=True)
class RequestLimits:
    vocab_size: int  # the model's embedding rows
    context_length: int  # prompt + output tokens of one request (<= the KV pool)
    kv_pool_tokens: int  # per DP group (every group's pool is the same size)
    dp_size: int

    def check(
        self, input_ids: Any, params: Any, return_logprob: Any = False, dp_rank: Any = None
    ) -> None:
        self.check_ids(input_ids, "input_ids")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, not {type(params).__name__}")
        params.validate()  # a hand-built SamplingParams skipped from_dict's check
        check_grammar(params)  # a grammar that does not parse never reaches a rank
        self.check_ids(params.stop_token_ids, "stop_token_ids", allow_empty=True)
        self.check_ids(list(params.logit_bias), "logit_bias", allow_empty=True)
        self.check_length(len(input_ids), params.max_new_tokens)
        if not isinstance(return_logprob, bool):
            raise ValueError("return_logprob must be true or false")
        if dp_rank is not None and (not _is_int(dp_rank) or not 0 <= dp_rank < self.dp_size):
            raise ValueError(f"dp_rank must be an integer in [0, {self.dp_size}), got {dp_rank!r}")

    def check_ids(self, ids: Any, what: str, allow_empty: bool = False) -> None:
        if not isinstance(ids, (list, tuple)):
            raise ValueError(f"{what} must be a list of token ids, not {type(ids).__name__}")
        if not ids and not allow_empty:
            raise ValueError(f"{what} must not be empty")
        for i, t in enumerate(ids):
            if not _is_int(t):
                raise ValueError(f"{what}[{i}] = {t!r} is not an integer token id")
            if not 0 <= t < self.vocab_size:
                raise ValueError(
                    f"{what}[{i}] = {t} is outside the model's vocabulary [0, {self.vocab_size})"
                )

    def check_length(self, n_prompt: int, max_new: int) -> None:
        ctx = self.context_length
        if n_prompt + max_new > ctx:
            raise ValueError(
                f"the request needs {n_prompt} prompt + {max_new} new = {n_prompt + max_new} "
                f"tokens, more than the context length {ctx} (KV pool {self.kv_pool_tokens} "
                "tokens per DP group); shorten the prompt or lower max_new_tokens"
            )


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
