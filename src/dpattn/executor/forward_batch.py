"""The batch description the model runner consumes (one rank, one forward step)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import IntEnum

import torch

from dpattn.executor.logprobs import PromptLogprobRequest


class ForwardMode(IntEnum):
    EXTEND = 1
    DECODE = 2
    MIXED = 3
    IDLE = 4
    PREBUILT = 5

    def is_extend_like(self) -> bool:
        return self in (ForwardMode.EXTEND, ForwardMode.MIXED)


@dataclass
class ForwardBatch:
    """One rank's tokens for one forward step (identical on the attn_tp ranks of a DP group)."""

    forward_mode: ForwardMode
    input_ids: torch.Tensor  # [n] int64
    positions: torch.Tensor  # [n] int64
    out_cache_loc: torch.Tensor  # [n] KV slots the new tokens are written to
    req_pool_indices: list[int] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=list)  # KV length after this step, per request
    extend_lens: list[int] = field(default_factory=list)  # new tokens per request
    return_all_logits: bool = False  # logits of every token, not only each request's last
    prompt_logprobs: PromptLogprobRequest | None = None  # rows whose prompt logprobs are wanted
    # Gather metadata, written by the MLP sync (docs/design.md §3.4).
    global_num_tokens: list[int] | None = None
    global_num_tokens_for_logprob: list[int] | None = None
    is_extend_in_batch: bool = False
    can_run_graph: bool = False

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device) -> ForwardBatch:
        """The token tensors on the model's device (host -> device copies: no GPU sync)."""
        if self.input_ids.device == device and self.out_cache_loc.device == device:
            return self
        prompt = self.prompt_logprobs
        if prompt is not None:
            prompt = replace(
                prompt,
                rows=prompt.rows.to(device, non_blocking=True),
                targets=prompt.targets.to(device, non_blocking=True),
            )
        return replace(
            self,
            input_ids=self.input_ids.to(device, non_blocking=True),
            positions=self.positions.to(device, non_blocking=True),
            out_cache_loc=self.out_cache_loc.to(device, non_blocking=True),
            prompt_logprobs=prompt,
        )

    @classmethod
    def idle(cls) -> ForwardBatch:
        empty = torch.zeros(0, dtype=torch.int64)
        return cls(ForwardMode.IDLE, empty, empty, empty)
