"""DP gather / scatter between attention (local rows per DP group) and MLP (global rows).

The math is docs/design.md §4-5. Every DP group d has n_d real tokens, padded to p_d = ceil(n_d / A) * A.
MAX_LEN gives every group the same slot length P = max p (buffer B = D * P); SUM_LEN gives
group d exactly p_d rows (B = sum p). Slots tile [0, B). The residual stream between layers is
"local full": n_d rows, identical on the A ranks of the group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch

from dpattn.distributed.parallel_state import ParallelState


class PaddingMode(str, Enum):
    MAX_LEN = "max_len"
    SUM_LEN = "sum_len"


def pad_to(n: int, a: int) -> int:
    return math.ceil(n / a) * a


def choose_padding_mode(
    padded: list[int],
    is_extend_in_batch: bool,
    override: str = "auto",
    graph: bool = False,
    attn_tp_size: int = 1,
    native_reduce_scatter: bool = True,
) -> PaddingMode:
    """docs/design.md §4: graph replay => MAX_LEN; D == 1 or an extend => SUM_LEN; else the
    mode whose collectives (as the backend runs them) move fewer rows."""
    if override != "auto":
        return PaddingMode(override)
    if graph:
        return PaddingMode.MAX_LEN
    d = len(padded)
    if d == 1 or is_extend_in_batch:
        # D == 1: SUM_LEN is the plain TP all-reduce, one collective each way instead of a
        # reduce-scatter + all-gather pair.
        return PaddingMode.SUM_LEN
    total, biggest = sum(padded), max(padded)
    if native_reduce_scatter:
        # all-gather moves D*P rows; the sum all-reduce moves ~2*sum(p).
        return PaddingMode.MAX_LEN if 2 * total >= d * biggest else PaddingMode.SUM_LEN
    # Emulated reduce-scatter (an all-reduce): MAX_LEN pays all-gather(D*P) + all-reduce(D*P),
    # plus two attn_tp collectives at A > 1, against SUM_LEN's two all-reduces of sum(p).
    if attn_tp_size > 1:
        return PaddingMode.SUM_LEN
    return PaddingMode.MAX_LEN if 3 * d * biggest <= 4 * total else PaddingMode.SUM_LEN


@dataclass(frozen=True)
class GatherPlan:
    """Where each DP group's rows sit in the global buffer. Identical on every rank."""

    attn_tp_size: int
    global_num_tokens: tuple[int, ...]
    mode: PaddingMode
    padded: tuple[int, ...]  # p_d, multiples of A
    lens: tuple[int, ...]  # L_d: rows of group d in the global buffer
    starts: tuple[int, ...]  # s_d

    @property
    def total(self) -> int:
        return sum(self.lens)

    def real_rows(self, device: torch.device | None = None) -> torch.Tensor | None:
        """Indices of the real (not padding) rows of the global buffer; None if all are real.

        Group d's rows keep their order inside its slot in both modes (dp-major numbering), so
        its real rows are [s_d, s_d + n_d)."""
        if self.total == sum(self.global_num_tokens):
            return None
        spans = [
            torch.arange(s, s + n, device=device)
            for s, n in zip(self.starts, self.global_num_tokens)
        ]
        return torch.cat(spans)

    @classmethod
    def build(
        cls,
        global_num_tokens: list[int],
        attn_tp_size: int,
        is_extend_in_batch: bool = False,
        override: str = "auto",
        graph: bool = False,
        native_reduce_scatter: bool = True,
        graph_bs: int | None = None,
    ) -> GatherPlan:
        """`graph_bs`: a CUDA graph replay, captured for that many tokens per DP group: MAX_LEN
        with every slot that size (docs/design.md §4), whatever the override says."""
        padded = [pad_to(n, attn_tp_size) for n in global_num_tokens]
        if graph_bs is not None:
            if graph_bs % attn_tp_size or graph_bs < max(padded, default=0):
                raise ValueError(f"graph size {graph_bs} cannot hold {global_num_tokens}")
            mode = PaddingMode.MAX_LEN
        else:
            mode = choose_padding_mode(
                padded, is_extend_in_batch, override, graph, attn_tp_size, native_reduce_scatter
            )
        slot = graph_bs if graph_bs is not None else max(padded)
        lens = [slot] * len(padded) if mode is PaddingMode.MAX_LEN else padded
        starts = [sum(lens[:d]) for d in range(len(lens))]
        return cls(
            attn_tp_size, tuple(global_num_tokens), mode, tuple(padded), tuple(lens), tuple(starts)
        )


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[0] == rows:
        return x
    out = x.new_zeros((rows, *x.shape[1:]))
    out[: x.shape[0]] = x
    return out


def _own_contribution(
    ps: ParallelState, partial: torch.Tensor, residual: torch.Tensor
) -> torch.Tensor:
    # The attention output is a partial sum over attn_tp; the residual is replicated there, so
    # only the group's leader adds it before anything sums over the group.
    return partial + residual if ps.attn_tp_rank == 0 else partial


def dp_gather(
    ps: ParallelState, plan: GatherPlan, partial: torch.Tensor, residual: torch.Tensor
) -> torch.Tensor:
    """Local (attention partial, residual) of n_d rows -> global summed hidden [B, H]."""
    d, a = ps.dp_rank, ps.attn_tp_size
    own = _own_contribution(ps, partial, residual)
    if plan.mode is PaddingMode.SUM_LEN:
        if own.shape[0] == plan.total:  # every row is this group's (D == 1): nothing to place
            return ps.world.all_reduce(own)
        buf = own.new_zeros((plan.total, *own.shape[1:]))
        buf[plan.starts[d] : plan.starts[d] + own.shape[0]] = own
        return ps.world.all_reduce(buf)
    local = _pad_rows(own, plan.lens[d])
    if a > 1:  # finish o_proj's partial sum; chunk lands at d*P + a*P/A after the world gather
        local = ps.attn_tp.reduce_scatter(local)
    return ps.world.all_gather(local)


def dp_scatter(
    ps: ParallelState, plan: GatherPlan, mlp_partial: torch.Tensor, hidden: torch.Tensor
) -> torch.Tensor:
    """Global (MLP partial over world, summed hidden) -> this group's n_d rows of their sum."""
    d = ps.dp_rank
    n = plan.global_num_tokens[d]
    if plan.mode is PaddingMode.SUM_LEN:
        full = ps.world.all_reduce(mlp_partial)
        lo = plan.starts[d]
        return full[lo : lo + n] + hidden[lo : lo + n]
    chunk = ps.world.reduce_scatter(mlp_partial)
    lo = ps.rank * chunk.shape[0]
    chunk = chunk + hidden[lo : lo + chunk.shape[0]]
    return ps.attn_tp.all_gather(chunk)[:n]


def attn_tp_scatter(
    ps: ParallelState, plan: GatherPlan, partial: torch.Tensor, residual: torch.Tensor
) -> torch.Tensor:
    """Scattered MLP layout: this rank's p_d / A rows of the group's summed hidden."""
    own = _pad_rows(_own_contribution(ps, partial, residual), plan.padded[ps.dp_rank])
    return ps.attn_tp.reduce_scatter(own)


def attn_tp_gather(ps: ParallelState, plan: GatherPlan, chunk: torch.Tensor) -> torch.Tensor:
    """Scattered MLP layout: the group's chunks back to its n_d local rows."""
    return ps.attn_tp.all_gather(chunk)[: plan.global_num_tokens[ps.dp_rank]]
