"""Request state and the scheduler's batch (what one rank runs in one iteration)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from enum import Enum

import torch

from dpattn.executor.forward_batch import ForwardBatch, ForwardMode
from dpattn.executor.grammar import MaskFill, Matcher
from dpattn.executor.logprobs import PromptLogprobRequest, PromptLogprobs
from dpattn.executor.sampler import sample
from dpattn.executor.sampling_batch_info import SamplingBatchInfo
from dpattn.executor.sampling_params import SamplingParams
from dpattn.kvcache.radix_tree import TreeNode
from dpattn.messages import BootstrapInfo, RequestOutput, TokenizedGenerateReq


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
    # Prompt logprobs from this prompt position on (-1: none; SGLang's logprob_start_len),
    # and top alternatives per prompt and output token (both need return_logprob).
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    input_logprobs: list[float] = field(default_factory=list)  # collected over prefill chunks
    input_top_logprobs: list[list[tuple[float, int]]] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    matched_stop: str | int | None = None
    # KV state on this rank (ownership of the row's slots: kvcache/prefix_cache.py)
    row: int | None = None  # req_to_token row
    kv_len: int = 0  # tokens whose KV is cached
    extend_len: int = 0  # tokens in the current step
    prefix_len: int = 0  # leading tokens whose slots the prefix cache holds for us
    last_node: TreeNode | None = None  # where that prefix ends in the tree (we hold its lock)
    cached_tokens: int = -1  # prompt tokens found in the cache at first admission (-1: not yet)
    retracted: bool = False  # sent back to wait once: re-admitted only with room to finish
    # Pipeline stages: its sampled token is on its way around the ring (scheduler/pipeline.py);
    # it cannot join another micro-batch until the result is applied.
    in_flight: bool = False
    generator: torch.Generator | None = None
    bootstrap: BootstrapInfo | None = None  # disaggregation: prefill's bootstrap address, room
    grammar: Matcher | None = None  # constrained decoding: the grammar's state after output_ids

    @classmethod
    def from_message(cls, msg: TokenizedGenerateReq) -> Req:
        """A rank's request state from the frontend's message."""
        return cls(
            msg.rid,
            list(msg.input_ids),
            msg.params,
            msg.seed,
            msg.return_logprob,
            msg.logprob_start_len,
            msg.top_logprobs_num,
            bootstrap=msg.bootstrap,
        )

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
        # One row per request (its last position) plus its prompt-logprob rows.
        if self.forward_mode is ForwardMode.IDLE:
            return 0
        prompt = self.prompt_logprobs
        return len(self.reqs) + (len(prompt.targets) if prompt is not None else 0)

    @functools.cached_property
    def prompt_logprobs(self) -> PromptLogprobRequest | None:
        """The rows of this extend whose next-token logprobs are prompt logprobs to return.
        Built once (the MLP sync counts them, the forward batch carries them), after the batch's
        requests and their extend lengths are final.

        A row at absolute position q predicts prompt token q + 1. A request asks for tokens from
        max(1, logprob_start_len) on; tokens already collected (earlier chunks, or before a
        retraction) are not asked again.
        """
        if not self.forward_mode.is_extend_like():
            return None
        rows: list[int] = []
        targets: list[int] = []
        counts: list[int] = []
        top_n, start = 0, 0
        for req in self.reqs:
            k = 0
            if req.return_logprob and req.logprob_start_len >= 0:
                s, e = req.kv_len, req.kv_len + req.extend_len
                want = max(1, req.logprob_start_len) + len(req.input_logprobs)
                lo, hi = max(s, want - 1), min(e, len(req.input_ids) - 1)
                if hi > lo:
                    k = hi - lo
                    rows += range(start + lo - s, start + hi - s)
                    targets += req.input_ids[lo + 1 : hi + 1]
                    top_n = max(top_n, req.top_logprobs_num)
            counts.append(k)
            start += req.extend_len
        if not rows:
            return None
        return PromptLogprobRequest(
            torch.tensor(rows, dtype=torch.int64),
            torch.tensor(targets, dtype=torch.int64),
            counts,
            top_n,
        )

    def to_forward_batch(self) -> ForwardBatch:
        return ForwardBatch(
            forward_mode=self.forward_mode,
            input_ids=torch.tensor(self.input_ids, dtype=torch.int64),
            positions=torch.tensor(self.positions, dtype=torch.int64),
            out_cache_loc=self.out_cache_loc,
            req_pool_indices=[r.row for r in self.reqs],  # type: ignore[misc]
            seq_lens=[r.kv_len + r.extend_len for r in self.reqs],
            extend_lens=[r.extend_len for r in self.reqs],
            prompt_logprobs=self.prompt_logprobs,
            global_num_tokens=self.global_num_tokens,
            global_num_tokens_for_logprob=self.global_num_tokens_for_logprob,
            is_extend_in_batch=self.is_extend_in_batch,
            can_run_graph=self.can_run_graph,
        )


def collect_prompt_logprobs(reqs: list[Req], prompt: PromptLogprobs) -> None:
    """Append one extend's prompt logprobs (and alternatives) to the requests that asked."""
    start = 0
    for req, k in zip(reqs, prompt.counts):
        req.input_logprobs += prompt.logprobs[start : start + k]
        if req.top_logprobs_num:
            tops = prompt.top[start : start + k]
            req.input_top_logprobs += [t[: req.top_logprobs_num] for t in tops]
        start += k


def sample_requests(
    reqs: list[Req], logits: torch.Tensor, masks: MaskFill | None, rows: list[int]
) -> tuple[list[int], list[float], list[list[tuple[float, int]]], dict[str, float]]:
    """One token per request from its row of ``logits`` (batch rows ``rows``), under its
    grammar's mask where it has one: (tokens, logprobs, top alternatives, grammar stats)."""
    raw, stats = logits, {}
    if masks is not None:
        if any(r.return_logprob for r in reqs):
            logits = logits.clone()  # logprobs stay the model's own
        stats = masks.apply(logits, rows)
    info = SamplingBatchInfo.from_params(
        [r.params for r in reqs],
        [r.rng() for r in reqs],
        [r.return_logprob for r in reqs],
        [r.top_logprobs_num if r.return_logprob else 0 for r in reqs],
        device=logits.device,
    )
    out = sample(logits, info, raw)
    tokens = out.next_token_ids.tolist()  # the step's one device -> host sync
    logprobs = out.logprobs.tolist() if out.logprobs is not None else [0.0] * len(reqs)
    tops = top_lists(out.top_logprobs, [r.top_logprobs_num for r in reqs])
    return tokens, logprobs, tops, stats


def token_output(
    req: Req, token: int, logprob: float, top: list[tuple[float, int]], reason: FinishReason | None
) -> RequestOutput:
    """The news of one sampled token; the prompt's logprobs travel once, with the first."""
    first = len(req.output_ids) == 1
    return RequestOutput(
        req.rid,
        [token],
        [logprob] if req.return_logprob else [],
        reason.value if reason is not None else None,
        req.matched_stop if reason is not None else None,
        prompt_tokens=len(req.input_ids),
        new_top_logprobs=[top] if req.top_logprobs_num else [],
        input_logprobs=req.input_logprobs if first else [],
        input_top_logprobs=req.input_top_logprobs if first else [],
        cached_tokens=max(0, req.cached_tokens) if first else 0,
    )


def scored_output(req: Req) -> RequestOutput:
    """The one news of a scoring-only request (max_new_tokens 0): its prompt's logprobs."""
    return RequestOutput(
        req.rid,
        [],
        [],
        FinishReason.LENGTH.value,
        prompt_tokens=len(req.input_ids),
        input_logprobs=req.input_logprobs,
        input_top_logprobs=req.input_top_logprobs,
        cached_tokens=max(0, req.cached_tokens),
    )


def top_lists(
    top: tuple[torch.Tensor, torch.Tensor] | None, nums: list[int]
) -> list[list[tuple[float, int]]]:
    """Per row, its first nums[i] (logprob, token id) alternatives."""
    if top is None:
        return [[] for _ in nums]
    vals, ids = top[0].tolist(), top[1].tolist()
    return [list(zip(v[:n], i[:n])) for v, i, n in zip(vals, ids, nums)]
