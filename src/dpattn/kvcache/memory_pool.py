"""Paged KV cache of one rank: token-slot pool (own KV heads only) and request-to-token table.

An MLA model's pool holds one latent row per token and layer (the normalised c_kv and the
rotated key part) as a single "KV head" of width kv_lora_rank + qk_rope_head_dim and no V
buffers: attention reads its values from the latent's first kv_lora_rank columns.
"""

from __future__ import annotations

from collections import deque

import torch


class ReqToTokenPool:
    """Row per running request: the KV slot of each of its token positions."""

    def __init__(self, size: int, max_context_len: int, device: torch.device) -> None:
        self.size = size
        self.max_context_len = max_context_len
        self.table = torch.zeros((size, max_context_len), dtype=torch.int64, device=device)
        self.free_rows = list(range(size - 1, -1, -1))  # a stack: pop() is O(1)

    def alloc(self) -> int | None:
        return self.free_rows.pop() if self.free_rows else None

    def free(self, row: int) -> None:
        self.free_rows.append(row)

    def available_size(self) -> int:
        return len(self.free_rows)


class KVPool:
    """K and V buffers [size, local_kv_heads, head_dim] per layer, and a free-slot list.

    `v_head_dim` 0: no V buffers (an MLA latent pool, `k` holds the latent rows).
    """

    def __init__(
        self,
        size: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        v_head_dim: int | None = None,
    ) -> None:
        self.size = size
        self.v_head_dim = head_dim if v_head_dim is None else v_head_dim
        # One row past the slots: no request ever owns it, so the padding rows of a CUDA graph
        # replay write their K/V there (SGLang reserves a padding slot the same way).
        self.pad_slot = size
        shape = (size + 1, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        v_shape = (size + 1, num_kv_heads, self.v_head_dim)
        self.v = [
            torch.zeros(v_shape, dtype=dtype, device=device)
            for _ in range(num_layers if self.v_head_dim else 0)
        ]
        # Free slots as a list of chunks: freeing appends one (O(1), no copy of the whole list),
        # allocating takes from the front and concatenates only the chunks it uses.
        self.free_chunks = deque([torch.arange(size, dtype=torch.int64, device=device)])
        self.num_free = size
        self.device = device

    @property
    def is_latent(self) -> bool:
        """An MLA latent pool: one row per token and layer, no V buffers."""
        return not self.v

    def layer_buffers(self, layer: int) -> list[torch.Tensor]:
        """The buffers that hold a layer's cache: [K, V], or [latent] for an MLA pool."""
        return [self.k[layer], self.v[layer]] if self.v else [self.k[layer]]

    def available_size(self) -> int:
        return self.num_free

    def free_slots(self) -> torch.Tensor:
        """Every free slot (debugging and tests; the allocator never needs them in one piece)."""
        return torch.cat([torch.zeros(0, dtype=torch.int64, device=self.device), *self.free_chunks])

    def alloc(self, n: int) -> torch.Tensor | None:
        if n > self.num_free:
            return None
        taken, need = [], n
        while need:
            chunk = self.free_chunks[0]
            if chunk.numel() <= need:
                taken.append(self.free_chunks.popleft())
                need -= chunk.numel()
            else:
                taken.append(chunk[:need])
                self.free_chunks[0] = chunk[need:]
                need = 0
        self.num_free -= n
        if len(taken) == 1:
            return taken[0]
        return torch.cat(taken) if taken else torch.zeros(0, dtype=torch.int64, device=self.device)

    def free(self, slots: torch.Tensor) -> None:
        if slots.numel():
            self.free_chunks.append(slots.to(self.device))
            self.num_free += int(slots.numel())

    def write(
        self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None
    ) -> None:
        self.k[layer][slots] = k
        if v is not None:
            self.v[layer][slots] = v
