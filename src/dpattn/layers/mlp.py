"""Dense MLP: gate/up column-parallel and down row-parallel over world (a partial sum over
world), or whole on every rank in the scattered layout (a full sum)."""

from __future__ import annotations

import torch
from torch import nn

from dpattn.distributed.parallel_state import ParallelState
from dpattn.layers.activation import ACTIVATIONS
from dpattn.layers.linear import linear, pack_params
from dpattn.layers.weights import param, shard


def gate_up_loader(index: int, parts: int, dim: int) -> object:
    """Fused [gate; up] rows: shard each half, keep them stacked."""

    def load(full: torch.Tensor) -> torch.Tensor:
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([shard(gate, dim, index, parts), shard(up, dim, index, parts)], dim=dim)

    return load


class DenseMLP(nn.Module):
    def __init__(
        self,
        ps: ParallelState,
        hidden: int,
        inter: int,
        act: str,
        dtype: torch.dtype,
        scattered: bool,
    ) -> None:
        super().__init__()
        parts, index = (1, 0) if scattered else (ps.tp_size, ps.rank)
        if inter % parts:
            raise ValueError(f"intermediate size {inter} cannot be split over {parts} ranks")
        local = inter // parts
        self.gate_up_proj = param((2 * local, hidden), dtype, gate_up_loader(index, parts, 0))
        self.down_proj = param((hidden, local), dtype, lambda full: shard(full, 1, index, parts))
        self.act = ACTIVATIONS[act]

    def prepack(self) -> None:
        pack_params(self, "gate_up_proj", "down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = linear(x, self.gate_up_proj).chunk(2, dim=-1)
        return linear(self.act(gate) * up, self.down_proj)
