"""Paged KV cache of one rank: token-slot pool (own KV heads only) and request-to-token table."""

from __future__ import annotations

import torch


class ReqToTokenPool:
    """Row per running request: the KV slot of each of its token positions."""

    def __init__(self, size: int, max_context_len: int, device: torch.device) -> None:
        self.size = size
        self.max_context_len = max_context_len
        self.table = torch.zeros((size, max_context_len), dtype=torch.int64, device=device)
        self.free_rows = list(range(size))

    def alloc(self) -> int | None:
        return self.free_rows.pop(0) if self.free_rows else None

    def free(self, row: int) -> None:
        self.free_rows.append(row)

    def available_size(self) -> int:
        return len(self.free_rows)


class KVPool:
    """K and V buffers [size, local_kv_heads, head_dim] per layer, and a free-slot list."""

    def __init__(
        self,
        size: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.size = size
        shape = (size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.free_slots = torch.arange(size, dtype=torch.int64, device=device)

    def available_size(self) -> int:
        return int(self.free_slots.numel())

    def alloc(self, n: int) -> torch.Tensor | None:
        if n > self.free_slots.numel():
            return None
        out, self.free_slots = self.free_slots[:n], self.free_slots[n:]
        return out

    def free(self, slots: torch.Tensor) -> None:
        if slots.numel():
            self.free_slots = torch.cat([self.free_slots, slots.to(self.free_slots.device)])

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer][slots] = k
        self.v[layer][slots] = v
