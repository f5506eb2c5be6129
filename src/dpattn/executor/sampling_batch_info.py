"""The sampling state of one step's batch: per-row filters, row lists and device indices,
built once from the requests' params on the host.

``from_params(..., device=logits.device)``: the per-row tensors must live with the logits;
generators may be CPU ones (one uniform per row is copied over). Row lists are host lists, so
the sampler never reads a device tensor back to decide what to do (no sync on a GPU).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dpattn.executor.sampling_params import SamplingParams

MAX_TOP_LOGPROBS = 20


def _index(rows: list[int], n: int, device: torch.device) -> torch.Tensor | None:
    # None means "every row" (callers then skip the index_select / index_copy entirely) or "no
    # row" (never read: callers check the list first). A host-to-device copy waits for the
    # device on a GPU, so none is made that the step does not use.
    return None if len(rows) in (0, n) else torch.tensor(rows, dtype=torch.long, device=device)


@dataclass
class RowFilters:
    """The filters of the rows drawn at random, [R] each (R = len(sample_rows))."""

    temperature: torch.Tensor  # fp32, > 0
    top_k: torch.Tensor  # int64, <= 0 means "off"
    top_p: torch.Tensor  # fp32, inf means "off" (top_p == 1)
    min_p: torch.Tensor  # fp32, 0 means "off"

    @classmethod
    def of(cls, params: Sequence[SamplingParams], dev: torch.device) -> RowFilters:
        def f32(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=dev)

        return cls(
            temperature=f32([p.temperature for p in params]),
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.long, device=dev),
            # "Off" is decided on the Python value, as in the reference: a top_p just below 1
            # that rounds to 1.0 in fp32 still cuts where the fp32 cumsum overshoots 1.
            top_p=f32([p.top_p if p.top_p < 1 else torch.inf for p in params]),
            min_p=f32([p.min_p for p in params]),
        )


@dataclass
class SamplingBatchInfo:
    """Per-row sampling state for one step, built once from the batch's requests.

    Row lists are computed on the host from the Python params, so ``sample`` never has to read
    a device tensor back to decide what to do (no sync on GPU).
    """

    filters: RowFilters | None  # None: every row is greedy (no tensor built)
    greedy: list[bool]
    generators: list[torch.Generator]
    return_logprob: list[bool]
    top_logprobs_num: list[int]
    all_greedy: bool
    need_top_k: bool  # only counts rows that actually sample
    need_top_p: bool
    need_min_p: bool
    max_top_logprobs_num: int
    # (rows, token ids, values) added to the logits before sampling; None: no row has a bias
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    sample_rows: list[int]  # rows drawn at random (not greedy)
    greedy_rows: list[int]
    logprob_rows: list[int]  # rows that want logprobs
    sample_index: torch.Tensor | None  # device copies of the lists; None = all B rows
    greedy_index: torch.Tensor | None
    logprob_index: torch.Tensor | None

    @property
    def batch_size(self) -> int:
        return len(self.greedy)

    @classmethod
    def from_params(
        cls,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator],
        return_logprob: Sequence[bool],
        top_logprobs_num: Sequence[int],
        *,
        device: torch.device | str = "cpu",
    ) -> SamplingBatchInfo:
        b = len(params)
        if not (len(generators) == len(return_logprob) == len(top_logprobs_num) == b):
            raise ValueError(
                "params, generators, return_logprob, top_logprobs_num differ in length"
            )
        for want, n in zip(return_logprob, top_logprobs_num):
            if not 0 <= n <= MAX_TOP_LOGPROBS:
                raise ValueError(f"top_logprobs_num must be in [0, {MAX_TOP_LOGPROBS}]")
            if n and not want:
                raise ValueError("top_logprobs_num > 0 needs return_logprob")
        dev = torch.device(device)
        greedy = [p.greedy for p in params]
        sample_rows = [i for i, g in enumerate(greedy) if not g]
        greedy_rows = [i for i, g in enumerate(greedy) if g]
        logprob_rows = [i for i, w in enumerate(return_logprob) if w]
        sampled = [params[i] for i in sample_rows]
        return cls(
            filters=RowFilters.of(sampled, dev) if sampled else None,
            greedy=greedy,
            generators=list(generators),
            return_logprob=list(return_logprob),
            top_logprobs_num=list(top_logprobs_num),
            all_greedy=not sample_rows,
            need_top_k=any(p.top_k > 0 for p in sampled),
            need_top_p=any(p.top_p < 1 for p in sampled),
            need_min_p=any(p.min_p > 0 for p in sampled),
            max_top_logprobs_num=max(top_logprobs_num, default=0),
            logit_bias=_bias(params, dev),
            sample_rows=sample_rows,
            greedy_rows=greedy_rows,
            logprob_rows=logprob_rows,
            sample_index=_index(sample_rows, b, dev),
            greedy_index=_index(greedy_rows, b, dev),
            logprob_index=_index(logprob_rows, b, dev),
        )


def _bias(
    params: Sequence[SamplingParams], dev: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    entries = [(r, t, b) for r, p in enumerate(params) for t, b in p.logit_bias.items()]
    if not entries:
        return None
    rows, ids, vals = zip(*entries)
    return (
        torch.tensor(rows, device=dev),
        torch.tensor(ids, device=dev),
        torch.tensor(vals, dtype=torch.float32, device=dev),
    )
