"""Rotary position embedding from the HF config's rope parameters: neox style (rotate half), or
DeepSeek's interleaved pairs (x0, x1), (x2, x3), ... each rotated by one frequency."""

from __future__ import annotations

import torch
from torch import nn

from dpattn.layers.forward_context import get_forward_context


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
    def __init__(
        self, inv_freq: torch.Tensor, scaling: float = 1.0, interleaved: bool = False
    ) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.scaling = scaling
        self.interleaved = interleaved

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [n, heads, d], k: [n, kv_heads, d]; neox-style (rotate half), like HF Llama."""
        memo = get_forward_context().memo  # every layer of a forward: the same positions
        key = (self, q.dtype)
        if key not in memo:
            memo[key] = self.cos_sin(positions, q.dtype)
        cos, sin = memo[key]
        if self.interleaved:
            return _rotate_pairs(q, cos, sin), _rotate_pairs(k, cos, sin)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.scaling).to(dtype)[:, None, :]
        sin = (emb.sin() * self.scaling).to(dtype)[:, None, :]
        return cos, sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved pairs rotated, the result laid out as [evens', odds'] (as transformers'
    DeepSeek V3 does): q and k get the same permutation, so their dot products are unchanged."""
    half = cos.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
