"""Transfer states and the attention-TP consensus on them (DESIGN §8).

The order matters: Failed < Bootstrapping < WaitingForInput < Transferring < Success, so the
minimum over the ranks of a DP group is the state the whole group has reached (a Failed on any
rank fails the request everywhere). A rank acts on a request only after that consensus, which
keeps the queues identical across the ranks of a group (otherwise the next MLP sync diverges).
"""

from __future__ import annotations

from enum import IntEnum

import torch

from dpattn.distributed.parallel_state import ParallelState
from dpattn.messages import RequestOutput
from dpattn.scheduler.schedule_batch import FinishReason, Req


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
