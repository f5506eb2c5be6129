"""Rank numbering of an engine (docs/design.md §1, pipeline stages included): pure arithmetic.

P = pp_size pipeline stages, each a full replica layout of T = tp_size ranks: D = dp_size DP
groups of attention-TP width A = T / D. World = P * T ranks, numbered **stage-major**:
global rank g = s * T + r, where s = g // T is the stage (pp_rank) and r = g % T the rank inside
the stage. Inside a stage r is numbered dp-major as before: DP group r // A, attn_tp rank r % A.
At P == 1 the global rank is the rank inside the (only) stage, so every mapping is unchanged.

A **lane** is one (dp, attn_tp) position through all stages: the P ranks with the same r. A
stage's activations go to the same position of the next stage, and the last stage's results go
around the ring to stage 0.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    """T, D (per stage) and P. `tp_size`, `dp_size` and `attn_tp_size` stay the stage's."""

    tp_size: int = 1
    dp_size: int = 1
    pp_size: int = 1

    def __post_init__(self) -> None:
        if self.tp_size < 1 or self.dp_size < 1 or self.tp_size % self.dp_size:
            raise ValueError(
                f"tp_size {self.tp_size} must be a positive multiple of dp_size {self.dp_size}"
            )
        if self.pp_size < 1:
            raise ValueError(f"pp_size {self.pp_size} must be at least 1")

    @property
    def attn_tp_size(self) -> int:
        return self.tp_size // self.dp_size

    @property
    def world_size(self) -> int:
        """All ranks of the engine: P stages of T ranks."""
        return self.pp_size * self.tp_size

    # Per stage. `rank` may be global or the rank inside its stage: both give the same answer.
    def dp_rank(self, rank: int) -> int:
        return rank % self.tp_size // self.attn_tp_size

    def attn_tp_rank(self, rank: int) -> int:
        return rank % self.attn_tp_size

    def attn_tp_ranks(self, dp_rank: int, stage: int = 0) -> list[int]:
        """Global ranks of DP group `dp_rank` in `stage` (stage 0: as at pp_size 1)."""
        base = self._stage_base(stage) + dp_rank * self.attn_tp_size
        return list(range(base, base + self.attn_tp_size))

    # Across stages: these take a global rank.
    def stage(self, rank: int) -> int:
        """The pipeline stage (pp_rank) of a global rank."""
        self._check_rank(rank)
        return rank // self.tp_size

    def rank_in_stage(self, rank: int) -> int:
        self._check_rank(rank)
        return rank % self.tp_size

    def global_rank(self, stage: int, rank_in_stage: int) -> int:
        if not 0 <= rank_in_stage < self.tp_size:
            raise ValueError(f"rank {rank_in_stage} is outside a stage of {self.tp_size} ranks")
        return self._stage_base(stage) + rank_in_stage

    def stage_ranks(self, stage: int) -> list[int]:
        """The T global ranks of one stage: its world group."""
        base = self._stage_base(stage)
        return list(range(base, base + self.tp_size))

    def lane_ranks(self, rank: int) -> list[int]:
        """The P ranks at this rank's (dp, attn_tp) position, stage 0 first: its pipeline lane."""
        r = self.rank_in_stage(rank)
        return [s * self.tp_size + r for s in range(self.pp_size)]

    def next_stage_rank(self, rank: int) -> int:
        """The same position in the next stage; after the last stage comes stage 0 (the ring)."""
        return self.global_rank((self.stage(rank) + 1) % self.pp_size, self.rank_in_stage(rank))

    def prev_stage_rank(self, rank: int) -> int:
        """The same position in the previous stage; before stage 0 comes the last (the ring)."""
        return self.global_rank((self.stage(rank) - 1) % self.pp_size, self.rank_in_stage(rank))

    def _stage_base(self, stage: int) -> int:
        if not 0 <= stage < self.pp_size:
            raise ValueError(f"stage {stage} is outside a pipeline of {self.pp_size} stages")
        return stage * self.tp_size

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a world of {self.world_size} ranks")


def layer_partition(
    num_layers: int, pp_size: int, explicit: list[int] | None = None
) -> list[tuple[int, int]]:
    """Each stage's decoder layers as [start, end) ranges, stage 0 first.

    `explicit`: per-stage layer counts (SGLang's `--pp-layer-partition`), which must be pp_size
    positive counts summing to num_layers. Without it the split is as even as possible, and the
    layers left over go to the stages just before the last one, latest first (vLLM's and
    SGLang's rule): the last stage also runs the final norm and the LM head, stage 0 only the
    embedding lookup. So 3 layers over 2 stages are [2, 1] and 7 over 4 are [2, 2, 2, 1].
    Errors are one line, worded for the command line.
    """
    if num_layers < 1:
        raise ValueError(f"the model has {num_layers} decoder layers: nothing to partition")
    if pp_size < 1:
        raise ValueError(f"--pp-size must be at least 1, got {pp_size}")
    if pp_size > num_layers:
        raise ValueError(
            f"--pp-size {pp_size} is larger than the model's {num_layers} decoder layers "
            "(every stage needs at least one)"
        )
    if explicit is None:
        counts = [num_layers // pp_size] * pp_size
        for i in range(2, num_layers % pp_size + 2):
            counts[-i] += 1
    else:
        counts = list(explicit)
        shown = ",".join(str(c) for c in counts)
        if len(counts) != pp_size:
            raise ValueError(
                f"--pp-layer-partition {shown} has {len(counts)} entries; --pp-size {pp_size} "
                f"needs {pp_size}"
            )
        if any(c < 1 for c in counts):
            raise ValueError(f"--pp-layer-partition {shown}: every stage needs at least one layer")
        if sum(counts) != num_layers:
            raise ValueError(
                f"--pp-layer-partition {shown} sums to {sum(counts)}, but the model has "
                f"{num_layers} decoder layers"
            )
    bounds, start = [], 0
    for c in counts:
        bounds.append((start, start + c))
        start += c
    return bounds
