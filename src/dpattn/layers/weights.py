"""Sharded parameters: each parameter knows how to cut its shard out of the checkpoint tensor."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

WeightLoader = Callable[[torch.Tensor], torch.Tensor]


def shard(full: torch.Tensor, dim: int, index: int, parts: int) -> torch.Tensor:
    size = full.shape[dim]
    if size % parts:
        raise ValueError(f"cannot split dim {dim} of size {size} into {parts} shards")
    step = size // parts
    return full.narrow(dim, index * step, step)


def param(
    shape: tuple[int, ...], dtype: torch.dtype, loader: WeightLoader | None = None
) -> nn.Parameter:
    """An uninitialised parameter; `loader` turns the checkpoint's full tensor into our shard."""
    p = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    p.weight_loader = loader or (lambda full: full)  # type: ignore[attr-defined]
    return p


def load_param(p: nn.Parameter, full: torch.Tensor) -> None:
    local = p.weight_loader(full)  # type: ignore[attr-defined]
    if local.shape != p.shape:
        raise ValueError(
            f"checkpoint shard {tuple(local.shape)} does not fit parameter {tuple(p.shape)}"
        )
    p.data.copy_(local)
