"""Frontend request state: what the Engine keeps per request, the deltas it hands listeners,
and the meta_info of a finished request."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dpattn.executor.sampling_batch_info import MAX_TOP_LOGPROBS
from dpattn.messages import RequestOutput


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
    cached_tokens: int = 0  # prompt tokens the prefix cache served (in the first delta)
    error: str = ""  # with finish_reason "abort": why, when the engine says
    error_status: int = 0  # with "abort": 400 where the request was at fault (its grammar)


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
    cached_tokens: int = 0
    finish_reason: str | None = None
    matched_stop: str | int | None = None
    error: str = ""  # an abort's reason, when the engine says
    error_status: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    listeners: list[Callable[[Delta], None]] = field(default_factory=list)

    def absorb(self, o: RequestOutput) -> Delta:
        """Add one step's output; the delta listeners get."""
        self.output_ids += o.new_ids
        self.logprobs += o.new_logprobs
        self.top_logprobs += o.new_top_logprobs
        self.input_logprobs += o.input_logprobs
        self.input_top_logprobs += o.input_top_logprobs
        self.cached_tokens += o.cached_tokens
        if o.error:
            self.error, self.error_status = o.error, o.error_status
        return Delta(
            o.rid,
            o.new_ids,
            o.new_logprobs,
            o.finish_reason,
            o.matched_stop,
            o.new_top_logprobs,
            o.input_logprobs,
            o.input_top_logprobs,
            o.cached_tokens,
            error=o.error,
            error_status=o.error_status,
        )

    def so_far(self, rid: str) -> Delta:
        """Everything that arrived, as one delta (a listener that joins late)."""
        return Delta(
            rid,
            list(self.output_ids),
            list(self.logprobs),
            self.finish_reason,
            self.matched_stop,
            list(self.top_logprobs),
            list(self.input_logprobs),
            list(self.input_top_logprobs),
            self.cached_tokens,
            self.error,
            self.error_status,
        )

    def meta_info(self, rid: str) -> dict[str, Any]:
        """Engine.generate's meta_info, with SGLang's names for the logprobs."""
        meta: dict[str, Any] = {
            "id": rid,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": len(self.output_ids),
            "finish_reason": self.finish_reason,
            "matched_stop": self.matched_stop,
            "dp_rank": self.dp_rank,
            "cached_tokens": self.cached_tokens,
        }
        if self.error:  # an abort's reason (e.g. a grammar that did not compile)
            meta["error"] = self.error
        return meta | logprob_meta(
            self.output_ids,
            self.logprobs,
            self.top_logprobs,
            self.input_ids,
            self.logprob_start_len,
            self.input_logprobs,
            self.input_top_logprobs,
        )


def check_logprob_options(
    prompt_len: int,
    return_logprob: bool,
    logprob_start_len: int,
    top_logprobs_num: int,
    max_new_tokens: int = 1,
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
    if max_new_tokens == 0 and logprob_start_len < 0:
        raise ValueError(
            "max_new_tokens 0 only scores the prompt: ask for its logprobs "
            "(return_logprob with logprob_start_len >= 0), or ask for at least 1 token"
        )


TopLogprobs = list[list[tuple[float, int]]]


def logprob_meta(
    output_ids: list[int],
    logprobs: list[float],
    top_logprobs: TopLogprobs,
    input_ids: list[int],
    logprob_start_len: int,
    input_logprobs: list[float],
    input_top_logprobs: TopLogprobs,
) -> dict[str, Any]:
    """meta_info's logprob fields, with SGLang's names and layout."""
    meta: dict[str, Any] = {}
    if logprobs:
        meta["output_token_logprobs"] = list(zip(logprobs, output_ids))
    if top_logprobs:
        meta["output_top_logprobs"] = top_logprobs
    if logprob_start_len >= 0:
        # (logprob, id) per prompt token from logprob_start_len; nothing predicts the first
        # prompt token, so its logprob is None.
        head: list[Any] = [None] if logprob_start_len == 0 else []
        meta["input_token_logprobs"] = list(
            zip(head + input_logprobs, input_ids[logprob_start_len:])
        )
        if input_top_logprobs:
            meta["input_top_logprobs"] = head + input_top_logprobs
    return meta
