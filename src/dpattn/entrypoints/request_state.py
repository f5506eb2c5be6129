"""Frontend request state: what the Engine keeps per request, the deltas it hands listeners,
and the meta_info of a finished request."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dpattn.executor.sampler import MAX_TOP_LOGPROBS


@dataclass(frozen=True)
class Delta:
    """New tokens of one request; finish_reason set on the last one."""

    rid: str
    new_ids: list[int]
    new_logprobs: list[float]
    finish_reason: str | None
    matched_stop: str | int | None
    new_top_logprobs: list[list[tuple[float, int]]] = field(default_factory=list)
    # the prompt's logprobs (from logprob_start_len) and alternatives, in the first delta
    input_logprobs: list[float] = field(default_factory=list)
    input_top_logprobs: list[list[tuple[float, int]]] = field(default_factory=list)


@dataclass
class RequestState:
    """What the frontend knows of one submitted request, as its outputs arrive."""

    prompt_tokens: int
    dp_rank: int
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[float, int]]] = field(default_factory=list)
    input_logprobs: list[float] = field(default_factory=list)
    input_top_logprobs: list[list[tuple[float, int]]] = field(default_factory=list)
    input_ids: list[int] = field(default_factory=list)
    logprob_start_len: int = -1
    skip_special_tokens: bool = True
    finish_reason: str | None = None
    matched_stop: str | int | None = None
    done: threading.Event = field(default_factory=threading.Event)
    listeners: list[Callable[[Delta], None]] = field(default_factory=list)

    def meta_info(self, rid: str) -> dict[str, Any]:
        """Engine.generate's meta_info, with SGLang's names for the logprobs."""
        meta: dict[str, Any] = {
            "id": rid,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": len(self.output_ids),
            "finish_reason": self.finish_reason,
            "matched_stop": self.matched_stop,
            "dp_rank": self.dp_rank,
        }
        if self.logprobs:
            meta["output_token_logprobs"] = list(zip(self.logprobs, self.output_ids))
        if self.top_logprobs:
            meta["output_top_logprobs"] = self.top_logprobs
        if self.logprob_start_len >= 0:
            # (logprob, id) per prompt token from logprob_start_len; nothing predicts the
            # first prompt token, so its logprob is None.
            start = self.logprob_start_len
            head: list[Any] = [None] if start == 0 else []
            meta["input_token_logprobs"] = list(
                zip(head + self.input_logprobs, self.input_ids[start:])
            )
            if self.input_top_logprobs:
                meta["input_top_logprobs"] = head + self.input_top_logprobs
        return meta


def check_logprob_options(
    prompt_len: int, return_logprob: bool, logprob_start_len: int, top_logprobs_num: int
) -> None:
    if not -1 <= logprob_start_len < prompt_len:
        raise ValueError(
            f"logprob_start_len must be -1 (none) or a prompt position below {prompt_len}, "
            f"got {logprob_start_len}"
        )
    if not 0 <= top_logprobs_num <= MAX_TOP_LOGPROBS:
        raise ValueError(f"top_logprobs_num must be in [0, {MAX_TOP_LOGPROBS}]")
    if (logprob_start_len >= 0 or top_logprobs_num) and not return_logprob:
        raise ValueError("logprob_start_len and top_logprobs_num need return_logprob")
