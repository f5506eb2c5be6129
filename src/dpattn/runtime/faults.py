"""Faults a test injects into the rank loop through EngineConfig.fault (never set in serving)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpattn.distributed.parallel_state import ParallelState


@dataclass(frozen=True)
class DivergeAt:
    """Rank `rank` issues one extra world all-reduce before scheduler step `step`: what a rank
    that took a wrong local branch would do (the lock-step checker must name it)."""

    rank: int
    step: int

    def before_step(self, ps: ParallelState, step: int) -> None:
        if ps.rank == self.rank and step == self.step:
            ps.world.all_reduce(torch.zeros(1, device=ps.device))
