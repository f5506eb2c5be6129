"""Transfer states and the attention-TP consensus on them (docs/design.md §8).

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


class GroupDivergence(RuntimeError):
    """The ranks of one attention-TP group hold different queues: a scheduler bug that would
    otherwise surface later as a hang or a mismatched collective in the MLP sync."""


def consensus(
    ps: ParallelState, rooms: list[int], states: list[KVPoll], queue: str = "transfer"
) -> list[KVPoll]:
    """The min of each request's state over the attention-TP group (CPU group).

    The ranks of a group hold identical queues, so each passes the same rooms in the same
    order; that is checked, not assumed: one all-gather of the room count, then one of a
    [1, 2n] row (rooms, then states). A rank whose count or rooms differ from its peers' makes
    every rank of the group raise `GroupDivergence` naming each rank's rooms. No call when there
    is nothing to agree on (an empty queue on one rank only cannot be seen here: its peers then
    wait in a collective it never enters, until the collective timeout, or --debug-lockstep
    names it at once).
    """
    if len(rooms) != len(states):
        raise ValueError(f"{len(rooms)} rooms but {len(states)} states")
    if not states or ps.attn_tp_size == 1:
        return list(states)
    group = ps.attn_tp_cpu
    counts = group.all_gather(torch.tensor([[len(rooms)]], dtype=torch.int64)).flatten()
    if (counts != counts[0]).any():
        per_rank = group.all_gather_object(list(rooms))
        raise GroupDivergence(_divergence(ps, queue, per_rank))
    as_int64 = [r - 2**64 if r >= 2**63 else r for r in rooms]  # u64 rooms, compared bitwise
    row = torch.tensor([[*as_int64, *(int(s) for s in states)]], dtype=torch.int64)
    grid = group.all_gather(row)
    n = len(rooms)
    if (grid[:, :n] != grid[0, :n]).any():
        per_rank = [[r % 2**64 for r in held] for held in grid[:, :n].tolist()]
        raise GroupDivergence(_divergence(ps, queue, per_rank))
    return [KVPoll(int(v)) for v in grid[:, n:].min(dim=0).values.tolist()]


def _divergence(ps: ParallelState, queue: str, per_rank: list[list[int]]) -> str:
    ranks = ps.attn_tp_cpu.ranks
    held = "; ".join(
        f"rank {r}: {len(rooms)} rooms {_short(rooms)}" for r, rooms in zip(ranks, per_rank)
    )
    return (
        f"the {queue} queues of DP group {ps.dp_rank} diverged across its attention-TP ranks "
        f"(they must hold the same rooms in the same order): {held}"
    )


def _short(rooms: list[int], limit: int = 8) -> str:
    shown = ", ".join(str(r) for r in rooms[:limit])
    return f"[{shown}{', ...' if len(rooms) > limit else ''}]"


def aborted(req: Req, reason: str, status: int = 0) -> RequestOutput:
    """The end of a request that disaggregation gave up, with the reason for its client
    (status 400: the request's own fault, e.g. its grammar)."""
    return RequestOutput(
        req.rid,
        [],
        [],
        FinishReason.ABORT.value,
        prompt_tokens=len(req.input_ids),
        error=reason,
        error_status=status,
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
