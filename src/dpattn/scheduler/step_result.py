"""What a forward produces for the scheduler: the sampled tokens of one batch (docs/design.md §12).

Without pipeline stages a step samples and applies its result at once. With stages only the last
stage samples; its `StepResult` travels around the ring to stage 0 and on through the stages
(the output message), and every stage applies it to its own scheduler, P micro-batches later.
A batch that produces nothing (a middle prefill chunk that asks for no logprobs) sends no output
message at all: `needs_output` decides it from the batch alone, identically on every stage, and
the receiving side applies a `SkippedResult`, which fails loudly if anything reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dpattn.executor.forward_batch import ForwardMode
from dpattn.executor.logprobs import PromptLogprobs
from dpattn.scheduler.schedule_batch import FinishReason, ScheduleBatch


@dataclass(frozen=True)
class StepResult:
    """One batch's sampled rows (`sample_rows` order) and its prompt logprobs, if asked."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    tops: list[list[tuple[float, int]]] = field(default_factory=list)
    prompt: PromptLogprobs | None = None
    stats: dict[str, float] = field(default_factory=dict)  # grammar masks' share of the step
    # Per sampled row: why it stops, and what matched (None: it goes on). Decided where the
    # token is sampled (a grammar accepts each token once, there), applied on every stage.
    finish: list[tuple[FinishReason, str | int | None] | None] = field(default_factory=list)


class SkippedResult:
    """Stands in for an output message that was never sent: reading it is a protocol bug."""

    def __init__(self, what: str) -> None:
        self._what = what

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(
            f"{self._what}: its output message was skipped (it produces no token and no "
            f"logprobs), yet its result's {name!r} was read"
        )


def sample_rows(batch: ScheduleBatch) -> list[int]:
    """The batch rows that sample a token: a prompt's last chunk or a decode, unless the request
    only scores its prompt (max_new_tokens 0). A pure function of the batch as scheduled."""
    return [
        i
        for i, (req, last) in enumerate(zip(batch.reqs, batch.sample_mask))
        if last and req.params.max_new_tokens != 0
    ]


def needs_output(batch: ScheduleBatch | None) -> bool:
    """Whether running `batch` produces anything to apply: a token, a scored prompt's end or
    prompt logprobs. False for a middle prefill chunk without logprobs and for idle batches:
    their output message is skipped on every stage (no handshake: each stage computes this from
    its own copy of the batch)."""
    if batch is None or batch.forward_mode is ForwardMode.IDLE:
        return False
    return any(batch.sample_mask) or batch.prompt_logprobs is not None


def forward_stats(
    batch: ScheduleBatch, padded_tokens: int, padding_mode: str, forward_s: float
) -> dict[str, Any]:
    """The forward's share of a step's StepStats."""
    return dict(
        forward_mode=batch.forward_mode.name.lower(),
        num_tokens=batch.num_tokens,
        padded_tokens=padded_tokens,
        padding_mode=padding_mode,
        idle_batch=batch.forward_mode is ForwardMode.IDLE,
        forward_s=forward_s,
    )
