"""Prompt-token logprobs from vocab-parallel logits, gathering only what is needed.

Each attn_tp rank holds the logits of its vocab shard. Instead of all-gathering full-vocab rows,
each rank reduces its shard to a few numbers per row (its log-sum-exp, the target's logit if it
owns the target, its top-N) and only those are gathered over attn_tp and combined. At A == 1 the
same formula runs on the whole row with no collective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpattn.distributed.group import Group


@dataclass
class PromptLogprobRequest:
    """Which rows of one forward want prompt logprobs, and of which next tokens."""

    rows: torch.Tensor  # [R] indices into the forward's hidden rows
    targets: torch.Tensor  # [R] the token each row predicts (the prompt's next token)
    counts: list[int]  # rows per request, in batch order (0 for requests that ask nothing)
    top_n: int  # top alternatives per row (max over the batch's requests; 0: none)


@dataclass
class PromptLogprobs:
    logprobs: list[float]  # [R], request after request
    top: list[list[tuple[float, int]]]  # [R][top_n] (logprob, token id); empty lists if top_n 0
    counts: list[int]


def vocab_parallel_logprobs(
    local: torch.Tensor,
    lo: int,
    vocab_size: int,
    targets: torch.Tensor,
    top_n: int,
    attn_tp: Group,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """local: fp32 logits [R, S] of the vocab shard starting at token id `lo`.

    Returns logprob of each target [R], and the top_n logprobs [R, N] with their ids [R, N].
    """
    r, s = local.shape
    ids = torch.arange(lo, lo + s, device=local.device)
    local = local.masked_fill(ids >= vocab_size, float("-inf"))  # shard padding past the vocab
    lse = torch.logsumexp(local, dim=-1)
    owned = (targets >= lo) & (targets < lo + s)
    target_logit = local.gather(1, (targets - lo).clamp(0, s - 1)[:, None]).squeeze(1)
    target_logit = torch.where(owned, target_logit, 0.0)
    n = min(top_n, s)
    vals, idx = local.topk(n, dim=-1) if n else (local[:, :0], local[:, :0].long())
    if attn_tp.size == 1:
        return target_logit - lse, vals - lse[:, None], idx + lo
    # One small all-gather instead of full-vocab rows: [lse, target (0 if not owned), top-N].
    packed = torch.cat([lse[:, None], target_logit[:, None], vals, (idx + lo).to(local.dtype)], 1)
    parts = attn_tp.all_gather(packed[None]).view(attn_tp.size, r, 2 + 2 * n)
    total = torch.logsumexp(parts[:, :, 0], dim=0)
    logprobs = parts[:, :, 1].sum(0) - total  # exactly one rank owns each target
    all_vals = parts[:, :, 2 : 2 + n].permute(1, 0, 2).reshape(r, -1)
    all_ids = parts[:, :, 2 + n :].permute(1, 0, 2).reshape(r, -1).long()
    top_vals, pos = all_vals.topk(min(top_n, all_vals.shape[1]), dim=-1)
    return logprobs, top_vals - total[:, None], all_ids.gather(1, pos)
