"""Transfer states and the attention-TP consensus on them (DESIGN §8).

The order matters: Failed < Bootstrapping < WaitingForInput < Transferring < Success, so the
minimum over the ranks of a DP group is the state the whole group has reached (a Failed on any
rank fails the request everywhere). A rank acts on a request only after that consensus, which
keeps the queues identical across the ranks of a group (otherwise the next MLP sync diverges).
"""

from __future__ import annotations

import dataclasses
from enum import IntEnum
from typing import TYPE_CHECKING

import torch

from dpattn.distributed.parallel_state import ParallelState
from dpattn.messages import RequestOutput, StepStats
from dpattn.scheduler.schedule_batch import FinishReason, Req

if TYPE_CHECKING:  # transfer.py imports this module
    from dpattn.disaggregation.transfer import TransferStats


# A step that ran nothing while requests wait only on the other server (handshake, KV): the
# rank loop would spin at full speed; this short nap frees the core and costs a transfer at
# most this much latency.
NETWORK_WAIT_S = 0.0005


class KVPoll(IntEnum):
    Failed = 0
    Bootstrapping = 1
    WaitingForInput = 2
    Transferring = 3
    Success = 4


def advance(current: KVPoll, new: KVPoll) -> KVPoll:
    """States only move forward, and Failed sticks."""
    if current is KVPoll.Failed:
        return current
    if new is KVPoll.Failed:
        return new
    return max(current, new)


def consensus(ps: ParallelState, states: list[KVPoll]) -> list[KVPoll]:
    """The min of each request's state over the attention-TP group (CPU group).

    Every rank of a group calls this with the same number of states (its queues are identical
    to its peers'); one all-gather of a [1, n] row, no call when there is nothing to agree on.
    """
    if not states or ps.attn_tp_size == 1:
        return list(states)
    row = torch.tensor([[int(s) for s in states]], dtype=torch.int64)
    grid = ps.attn_tp_cpu.all_gather(row)
    return [KVPoll(int(v)) for v in grid.min(dim=0).values.tolist()]


def aborted(req: Req, reason: str) -> RequestOutput:
    """The end of a request that disaggregation gave up, with the reason for its client."""
    return RequestOutput(
        req.rid, [], [], FinishReason.ABORT.value, prompt_tokens=len(req.input_ids), error=reason
    )


def stats_with(stats: StepStats, queues: dict[str, int], moved: TransferStats) -> StepStats:
    """The step's stats with the disaggregation queues and the cumulative transfer figures."""
    figures = {k: float(v) for k, v in queues.items()}
    figures.update(bytes=float(moved.bytes), done=float(moved.done), failed=float(moved.failed))
    figures["seconds"] = moved.seconds
    return dataclasses.replace(stats, disaggregation=figures)


def agreed_reasons(ps: ParallelState, reasons: list[str]) -> list[str]:
    """For requests the group agreed failed: the first rank's non-empty reason, for every rank
    (a rank that saw no failure itself would otherwise tell its client nothing useful). Called
    by every rank of a group with the same number of reasons."""
    if not reasons or ps.attn_tp_size == 1:
        return reasons
    per_rank = ps.attn_tp_cpu.all_gather_object(reasons)
    return [next((r[i] for r in per_rank if r[i]), "") for i in range(len(reasons))]
