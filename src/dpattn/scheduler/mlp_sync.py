"""The MLP sync (docs/design.md §3): once per scheduler iteration, on every rank, in lock-step.

`decide` is a pure function of the DP group leaders' rows; `prepare_mlp_sync_batch` is the thin
transport around it: one all-gather over the world CPU group at D > 1, none at D == 1.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from dpattn.distributed.parallel_state import ParallelState
from dpattn.executor.forward_batch import ForwardMode
from dpattn.scheduler.schedule_batch import ScheduleBatch


@dataclass(frozen=True)
class SyncRow:
    num_tokens: int = 0
    num_tokens_for_logprob: int = 0
    can_run_graph: bool = False
    is_extend: bool = False
    forward_mode: int = 0  # 0: no batch
    shutdown: bool = False  # rides along so every rank leaves the loop in the same iteration
    # When this rank entered the sync (monotonic ns; one host's clock): splits the sync's time
    # into the wait for the slowest rank and the collective itself. Never read by `decide`.
    enter_ns: int = 0

    def as_list(self) -> list[int]:
        return [
            self.num_tokens,
            self.num_tokens_for_logprob,
            int(self.can_run_graph),
            int(self.is_extend),
            self.forward_mode,
            int(self.shutdown),
            self.enter_ns,
        ]


@dataclass(frozen=True)
class SyncDecision:
    global_num_tokens: list[int]
    global_num_tokens_for_logprob: list[int]
    can_run_graph: bool
    is_extend_in_batch: bool
    need_idle_batch: bool
    shutdown: bool = False
    extending_groups: int = 0  # DP cooperation: how many groups extend this step
    # All-gather skipped at D > 1: no rank knows the others' loads, so every rank has a batch
    # (rule 3) and every rank must run it, or a busy rank would wait alone in the MLP collectives.
    forced: bool = False
    # This rank's share of the sync: waiting for the last rank to arrive, then the collective.
    wait_s: float = field(default=0.0, compare=False)
    collective_s: float = field(default=0.0, compare=False)

    @property
    def run_forward(self) -> bool:
        # Rule 6: from gathered values (or the forcing, identical on all ranks), never local ones.
        return self.forced or max(self.global_num_tokens) > 0


# The model runner's graph vote: (mode or None for no batch, tokens, longest sequence) -> can
# this rank replay a captured CUDA graph for this step (ModelRunner.graph_vote).
GraphVote = Callable[[ForwardMode | None, int, int], bool]


def local_row(
    batch: ScheduleBatch | None, shutdown: bool = False, graph_vote: GraphVote | None = None
) -> SyncRow:
    """This rank's row. can_run_graph is the runner's vote when given, else the batch's flag."""
    if batch is None:
        return SyncRow(0, 0, graph_vote(None, 0, 0) if graph_vote else False, shutdown=shutdown)
    mode = batch.forward_mode
    no_forward = mode in (ForwardMode.IDLE, ForwardMode.PREBUILT)  # runs 0 rows (or an idle)
    graph = batch.can_run_graph
    if graph_vote is not None and no_forward:
        graph = graph_vote(mode, 0, 0)
    elif graph_vote is not None:
        longest = max((r.kv_len + r.extend_len for r in batch.reqs), default=0)
        graph = graph_vote(mode, batch.num_tokens, longest)
    if no_forward:
        return SyncRow(0, 0, graph, False, int(mode), shutdown)
    n = batch.num_tokens
    m = batch.num_tokens_for_logprob
    return SyncRow(n, m, graph, mode.is_extend_like(), int(mode), shutdown)


def decide(rows: list[SyncRow], dp_size: int, skip_all_gather: bool) -> SyncDecision:
    """Rules 2-3 over one row per DP group (the attn_tp leaders'); identical on all ranks."""
    return SyncDecision(
        global_num_tokens=[r.num_tokens for r in rows],
        global_num_tokens_for_logprob=[r.num_tokens_for_logprob for r in rows],
        can_run_graph=min(r.can_run_graph for r in rows),
        is_extend_in_batch=max(r.is_extend for r in rows),
        need_idle_batch=dp_size > 1 if skip_all_gather else max(r.num_tokens for r in rows) > 0,
        shutdown=max(r.shutdown for r in rows),
        extending_groups=sum(r.is_extend for r in rows),
        forced=skip_all_gather and dp_size > 1,
    )


def _gather_grid(ps: ParallelState, row: SyncRow) -> torch.Tensor:
    t = torch.tensor([row.as_list()], dtype=torch.int64)
    return ps.world_cpu.all_gather(t).view(ps.dp_size, ps.attn_tp_size, -1)


def _leader_rows(grid: torch.Tensor) -> list[SyncRow]:
    return [
        SyncRow(int(n), int(m), bool(g), bool(e), int(f), bool(s), int(t))
        for n, m, g, e, f, s, t in grid[:, 0, :].tolist()
    ]


def gather_rows(ps: ParallelState, row: SyncRow) -> list[SyncRow]:
    """All-gather every rank's row over world as [D, A, F] and keep the leaders' [:, 0, :]."""
    return _leader_rows(_gather_grid(ps, row))


def prepare_mlp_sync_batch(
    ps: ParallelState,
    batch: ScheduleBatch | None,
    skip_all_gather: bool | None = None,
    shutdown: bool = False,
    graph_vote: GraphVote | None = None,
) -> tuple[ScheduleBatch | None, SyncDecision]:
    """Returns the batch to run (None: no forward on any rank this iteration) and the decision.

    The decision's can_run_graph is the min of the ranks' votes: one rank that cannot replay
    (an extend, a batch or sequence larger than its graphs) makes every rank run eagerly."""
    skip = ps.dp_size == 1 if skip_all_gather is None else skip_all_gather
    row = local_row(batch, shutdown, graph_vote)
    if skip:
        decision = decide([row], ps.dp_size, skip)
    else:
        enter = time.monotonic_ns()
        grid = _gather_grid(ps, replace(row, enter_ns=enter))
        leave = time.monotonic_ns()
        last = max(enter, int(grid[:, :, -1].max()))  # when the slowest rank arrived
        decision = replace(
            decide(_leader_rows(grid), ps.dp_size, skip),
            wait_s=(last - enter) / 1e9,
            collective_s=max(0, leave - last) / 1e9,
        )
    batch_to_gather = batch
    if decision.need_idle_batch:
        if batch is None:
            batch = batch_to_gather = ScheduleBatch.idle()
        elif batch.forward_mode is ForwardMode.PREBUILT:
            batch.inner_idle_batch = batch_to_gather = ScheduleBatch.idle()
    if batch_to_gather is not None:  # rule 5: also when no idle batch was needed (D == 1 padding)
        batch_to_gather.global_num_tokens = decision.global_num_tokens
        batch_to_gather.global_num_tokens_for_logprob = decision.global_num_tokens_for_logprob
        batch_to_gather.is_extend_in_batch = decision.is_extend_in_batch
        batch_to_gather.can_run_graph = decision.can_run_graph
    return batch, decision


def batch_to_run(
    batch: ScheduleBatch | None, decision: SyncDecision, rank: int
) -> ScheduleBatch | None:
    """The batch whose forward this rank runs after the sync: None when no rank runs one (rule
    6), a PREBUILT batch's inner idle batch (its own requests run no rows), else the batch.

    When the ranks decided on a forward, every rank must join it: a rank without a batch to run
    would leave the others waiting in the MLP collectives until they time out. Rule 4 makes that
    impossible; should it ever happen, this says so at once, naming the rank."""
    if not decision.run_forward:
        return None
    if batch is None:
        raise RuntimeError(
            f"rank {rank}: the MLP sync decided on a forward (global_num_tokens "
            f"{decision.global_num_tokens}) but this rank has no batch to join it"
        )
    if batch.forward_mode is not ForwardMode.PREBUILT:
        return batch
    if batch.inner_idle_batch is None:
        raise RuntimeError(
            f"rank {rank}: the MLP sync decided on a forward (global_num_tokens "
            f"{decision.global_num_tokens}) but this rank's PREBUILT batch has no inner idle "
            "batch to join it"
        )
    return batch.inner_idle_batch
