"""Faults a test injects into the rank loop through EngineConfig.fault (never set in serving)."""

from __future__ import annotations

import os
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


@dataclass(frozen=True)
class FailAt:
    """Global rank `global_rank` fails before its scheduler step `step` (and every later one):
    `exit` ends its process without a word (os._exit, as a crash or the OOM killer would; a rank
    process only), else it raises. Any rank of any pipeline stage: the engine must name it."""

    global_rank: int
    step: int
    exit: bool = True

    def before_step(self, ps: ParallelState, step: int) -> None:
        if ps.global_rank != self.global_rank or step < self.step:
            return
        if self.exit:
            os._exit(3)
        raise RuntimeError(f"injected fault at step {step}")
