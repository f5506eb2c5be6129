"""Small building blocks: weight sharding, RMSNorm, rotary embedding, activations."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
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


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 like the reference; `offset` 1.0 gives Gemma's (1 + w) form."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = param((dim,), dtype)
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (xf * (self.offset + self.weight.float())).to(x.dtype)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(config: object, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling, from the HF config's rope parameters."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)), 1.0
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return inv_freq.float(), float(scaling)


class Rotary(nn.Module):
    def __init__(self, inv_freq: torch.Tensor, scaling: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.scaling = scaling

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [n, heads, d], k: [n, kv_heads, d]; neox-style (rotate half), like HF Llama."""
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.scaling).to(q.dtype)[:, None, :]
        sin = (emb.sin() * self.scaling).to(q.dtype)[:, None, :]
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}
