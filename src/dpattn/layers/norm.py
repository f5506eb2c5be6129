"""RMSNorm (Llama / Qwen form w * x, and Gemma's (1 + w) * x)."""

from __future__ import annotations

import torch
from torch import nn

from dpattn.layers.weights import param


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
