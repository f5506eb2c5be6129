"""Attention backends: paged KV attention for all requests of one step.

`init_forward_metadata` runs once per forward (slot indices, lengths, masks); `forward` runs
once per layer with that layer's q, k, v. A paged GPU kernel (FlashInfer, FlashAttention)
implements the same two methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dpattn.kvcache.memory_pool import KVPool, ReqToTokenPool


@dataclass
class AttentionMetadata:
    out_cache_loc: torch.Tensor  # [n] KV slots the step's new tokens are written to
    req_pool_indices: list[int]
    seq_lens: list[int]  # KV length after this step (prefix included), per request
    extend_lens: list[int]  # new tokens this step, per request


class AttentionBackend(ABC):
    def __init__(self, kv_pool: KVPool, req_to_token: ReqToTokenPool) -> None:
        self.kv_pool = kv_pool
        self.req_to_token = req_to_token
        self.metadata: AttentionMetadata | None = None

    @abstractmethod
    def init_forward_metadata(self, metadata: AttentionMetadata) -> None: ...

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [n, q_heads, d]
        k: torch.Tensor,  # [n, kv_heads, d]
        v: torch.Tensor,
        layer_id: int,
        scaling: float,
        sliding_window: int | None,
    ) -> torch.Tensor: ...


class TorchNativeBackend(AttentionBackend):
    def init_forward_metadata(self, metadata: AttentionMetadata) -> None:
        self.metadata = metadata

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer_id: int,
        scaling: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        md, pool = self.metadata, self.kv_pool
        assert md is not None, "init_forward_metadata was not called"
        pool.write(layer_id, md.out_cache_loc, k, v)
        k_buf, v_buf = pool.k[layer_id], pool.v[layer_id]
        out = torch.empty_like(q)
        start = 0
        for row, seq_len, ext in zip(md.req_pool_indices, md.seq_lens, md.extend_lens):
            slots = self.req_to_token.table[row, :seq_len]
            q_pos = torch.arange(seq_len - ext, seq_len, device=q.device)[:, None]
            k_pos = torch.arange(seq_len, device=q.device)[None, :]
            mask = k_pos <= q_pos
            if sliding_window:
                mask &= k_pos > q_pos - sliding_window
            o = F.scaled_dot_product_attention(
                q[start : start + ext].transpose(0, 1),
                k_buf[slots].transpose(0, 1),
                v_buf[slots].transpose(0, 1),
                attn_mask=mask,
                scale=scaling,
                enable_gqa=k.shape[1] != q.shape[1],
            )
            out[start : start + ext] = o.transpose(0, 1)
            start += ext
        return out
