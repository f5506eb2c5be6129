"""Request state and the scheduler's batch (what one rank runs in one iteration)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch

from dpattn.executor.forward_batch import ForwardBatch, ForwardMode
from dpattn.executor.sampling_params import SamplingParams


class FinishReason(str, Enum):
    LENGTH = "length"
    STOP = "stop"
    ABORT = "abort"


@dataclass
class Req:
    rid: str
    input_ids: list[int]
    params: SamplingParams
    seed: int  # the leader fixes it so every attn_tp rank draws the same tokens
    return_logprob: bool = False
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    matched_stop: str | int | None = None
    # KV state on this rank
    row: int | None = None  # req_to_token row
    kv_len: int = 0  # tokens whose KV is cached
    extend_len: int = 0  # tokens in the current step
    generator: torch.Generator | None = None

    @property
    def all_ids(self) -> list[int]:
        return self.input_ids + self.output_ids

    @property
    def seq_len(self) -> int:
        return len(self.input_ids) + len(self.output_ids)

    @property
    def last_id(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.input_ids[-1]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def rng(self) -> torch.Generator:
        if self.generator is None:
            self.generator = torch.Generator().manual_seed(self.seed)
        return self.generator


@dataclass
class ScheduleBatch:
    forward_mode: ForwardMode
    reqs: list[Req] = field(default_factory=list)
    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    out_cache_loc: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    # which reqs sample a token after this step (a non-final prefill chunk does not)
    sample_mask: list[bool] = field(default_factory=list)
    inner_idle_batch: ScheduleBatch | None = None  # PREBUILT: the batch that joins the collectives
    can_run_graph: bool = False
    # gather metadata, written by the MLP sync
    global_num_tokens: list[int] | None = None
    global_num_tokens_for_logprob: list[int] | None = None
    is_extend_in_batch: bool = False

    @classmethod
    def idle(cls) -> ScheduleBatch:
        return cls(ForwardMode.IDLE)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_tokens_for_logprob(self) -> int:
        # One logprob row per request: its last position (we return no prompt logprobs).
        return len(self.reqs) if self.forward_mode is not ForwardMode.IDLE else 0

    def to_forward_batch(self) -> ForwardBatch:
        return ForwardBatch(
            forward_mode=self.forward_mode,
            input_ids=torch.tensor(self.input_ids, dtype=torch.int64),
            positions=torch.tensor(self.positions, dtype=torch.int64),
            out_cache_loc=self.out_cache_loc,
            req_pool_indices=[r.row for r in self.reqs],  # type: ignore[misc]
            seq_lens=[r.kv_len + r.extend_len for r in self.reqs],
            extend_lens=[r.extend_len for r in self.reqs],
            global_num_tokens=self.global_num_tokens,
            global_num_tokens_for_logprob=self.global_num_tokens_for_logprob,
            is_extend_in_batch=self.is_extend_in_batch,
            can_run_graph=self.can_run_graph,
        )
