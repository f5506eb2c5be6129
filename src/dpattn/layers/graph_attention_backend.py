"""Decode attention over static buffers, for CUDA graph capture and replay.

A captured graph replays fixed kernels on fixed addresses, so everything the attention of one
step depends on lives in buffers filled before each replay: the KV slots each request reads
(padded to the graph's KV bucket), its query position and the slot its new K/V goes to. The
masks are computed inside the graph from those buffers. Rows past the real requests (the graph's
batch padding) read and write only the pool's padding slot.
"""

from __future__ import annotations

import torch

from dpattn.kvcache.memory_pool import KVPool, ReqToTokenPool
from dpattn.layers.attention_backend import AttentionBackend, Expand, RequestGroup, _attend


class GraphDecodeBackend(AttentionBackend):
    def __init__(
        self,
        kv_pool: KVPool,
        req_to_token: ReqToTokenPool,
        windows: set[int | None],
        max_bs: int,
        max_kv: int,
    ) -> None:
        super().__init__(kv_pool, req_to_token, windows)
        dev = kv_pool.device
        self.out_cache_loc_buf = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.q_pos_buf = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.kv_slots_buf = torch.zeros(max_bs * max_kv, dtype=torch.int64, device=dev)
        self.group: RequestGroup | None = None

    def prepare(self, bs: int, kv_len: int) -> None:
        """Views of the static buffers for a (bs, kv_len) graph; a fresh mask cache, so the
        masks of the capture are computed inside it."""
        self.out_cache_loc = self.out_cache_loc_buf[:bs]
        q_pos = self.q_pos_buf[:bs].view(bs, 1, 1)
        slots = self.kv_slots_buf[: bs * kv_len]
        self.group = RequestGroup(bs, 1, kv_len, slots, None, None, q_pos, full=False)

    def fill(
        self,
        bs: int,
        kv_len: int,
        req_pool_indices: list[int],
        seq_lens: list[int],
        out_cache_loc: torch.Tensor,
    ) -> None:
        """Write one step's metadata into the buffers (device ops only: no GPU sync)."""
        n, dev, pad = len(seq_lens), self.kv_pool.device, self.kv_pool.pad_slot
        self.out_cache_loc_buf[:n].copy_(out_cache_loc)
        self.out_cache_loc_buf[n:bs].fill_(pad)
        seq = torch.tensor(seq_lens + [1] * (bs - n), dtype=torch.int64, device=dev)[:, None]
        slots = torch.full((bs, kv_len), pad, dtype=torch.int64, device=dev)
        if n:
            rows = torch.tensor(req_pool_indices, dtype=torch.int64, device=dev)
            slots[:n] = self.req_to_token.table[rows, :kv_len]
        # Keys past a request's length are masked; point them at a slot it owns so they are
        # finite (the attention_backend rule: 0 * NaN would poison the output).
        k_pos = torch.arange(kv_len, device=dev)
        slots = torch.where(k_pos < seq, slots, slots[:, :1])
        self.kv_slots_buf[: bs * kv_len].copy_(slots.reshape(-1))
        self.q_pos_buf[:bs].copy_(seq[:, 0] - 1)

    def init_forward_metadata(
        self,
        req_pool_indices: list[int],
        seq_lens: list[int],
        extend_lens: list[int],
        out_cache_loc: torch.Tensor,
    ) -> None:
        raise RuntimeError("a graph decode step takes its metadata through fill()")

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer_id: int,
        scaling: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        g = self._group()
        pool_k, pool_v = self.kv_pool.k[layer_id], self.kv_pool.v[layer_id]
        pool_k.index_copy_(0, self.out_cache_loc, k)
        pool_v.index_copy_(0, self.out_cache_loc, v)
        k_g, v_g = pool_k.index_select(0, g.kv_slots), pool_v.index_select(0, g.kv_slots)
        return _attend(g, q, k_g, v_g, scaling, sliding_window)

    def forward_latent(
        self,
        q: torch.Tensor,
        latent: torch.Tensor,
        layer_id: int,
        scaling: float,
        v_dim: int,
        expand: Expand | None = None,
    ) -> torch.Tensor:
        if expand is not None:
            raise RuntimeError("a graph decode step attends absorbed (MLA decode)")
        g = self._group()
        pool = self.kv_pool.k[layer_id]
        pool.index_copy_(0, self.out_cache_loc, latent)
        rows = pool.index_select(0, g.kv_slots)
        return _attend(g, q, rows, rows[..., :v_dim], scaling, None)

    def _group(self) -> RequestGroup:
        if self.group is None:
            raise RuntimeError("prepare() must run before a graph decode forward")
        return self.group
