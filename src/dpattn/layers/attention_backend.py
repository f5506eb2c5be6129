"""Attention backends: paged KV attention for all requests of one step.

`init_forward_metadata` runs once per forward (slot tables, lengths, masks: `AttentionMetadata`),
`forward` once per layer with that layer's q, k, v. The CPU backend runs one padded SDPA call
per layer for all decodes of the step and one for all extends; a paged GPU kernel (FlashInfer,
FlashAttention) implements the same two methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from dpattn.kvcache.memory_pool import KVPool, ReqToTokenPool

# SDPA kernels on CUDA (the forward context sets them): not cuDNN's, which plans every new shape
# on the host, 2.6 ms a call (H200, torch 2.11): eager bf16 decode of Gemma 3 270M took 62 ms a
# step against 11 ms in fp32, where SDPA never picks cuDNN. Decode and prefill shapes change
# every step, so its plan cache does not help.
CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

Window = int | None
# MLA decompression: cached latent rows [m, 1, D] -> per-head (k [m, H, dk], v [m, H, dv])
Expand = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _key(window: Window) -> Window:
    # The layers treat a falsy window (None or 0) as full causal attention.
    return window if window else None


@dataclass
class RequestGroup:
    """Requests attended together in one padded SDPA call, as [B, heads, max_q, max_kv].

    Decodes (1 new token) and extends are kept in separate groups so that one long prefill in
    a mixed batch does not pad every decode to its query length.
    """

    batch_size: int
    max_q: int
    max_kv: int
    kv_slots: torch.Tensor  # [B * max_kv] pool slots; padding repeats the request's 1st slot
    token_index: torch.Tensor | None  # packed tokens of this group; None: all tokens, in order
    pad_index: torch.Tensor | None  # each token's row in [B * max_q]; None: no query padding
    q_pos: torch.Tensor  # [B, max_q, 1] absolute query positions (padding rows clamped)
    full: bool  # every query sees every key of its padded row under causal masking
    _masks: dict[tuple[Window, int], torch.Tensor | None] = field(default_factory=dict)

    def mask(self, window: Window, group_size: int = 1) -> torch.Tensor | None:
        """Boolean mask [B, 1, group_size * max_q, max_kv] (None: nothing masked), cached."""
        key = (_key(window), group_size)
        if key not in self._masks:
            self._masks[key] = self._make_mask(key[0], group_size)
        return self._masks[key]

    def _make_mask(self, window: Window, group_size: int) -> torch.Tensor | None:
        if self.full and (window is None or self.max_kv <= window):
            return None
        if group_size > 1 and self.max_q > 1:
            # Query rows are laid out (group member, position): repeat the base mask per member.
            base = self.mask(window)
            assert base is not None
            b, _, mq, mkv = base.shape
            return base.unsqueeze(2).expand(b, 1, group_size, mq, mkv).reshape(b, 1, -1, mkv)
        k_pos = torch.arange(self.max_kv, device=self.q_pos.device)
        # Causal by absolute position; this also hides padded keys (k_pos >= seq_len).
        mask = k_pos <= self.q_pos
        if window is not None:
            mask &= k_pos > self.q_pos - window
        return mask.unsqueeze(1)  # broadcasts over KV heads (and over group rows for decode)


@dataclass
class AttentionMetadata:
    """What attention needs about one forward, built once and shared by all layers."""

    num_tokens: int
    groups: list[RequestGroup]

    @classmethod
    def build(
        cls,
        req_to_token: torch.Tensor,
        req_pool_indices: list[int],
        seq_lens: list[int],
        extend_lens: list[int],
        device: torch.device | str,
        windows: set[int | None],
    ) -> AttentionMetadata:
        num_tokens = sum(extend_lens)
        # A 1-token extend is attended exactly like a decode, so it joins the decode group.
        decodes = [i for i, e in enumerate(extend_lens) if e == 1]
        extends = [i for i, e in enumerate(extend_lens) if e > 1]
        starts = [0] * len(extend_lens)
        for i in range(1, len(extend_lens)):
            starts[i] = starts[i - 1] + extend_lens[i - 1]
        groups: list[RequestGroup] = []
        for members in (decodes, extends):
            if not members:
                continue
            # With a single group the packed tokens are already in group order: skip the gather.
            token_index = None
            if len(members) != len(extend_lens):
                token_index = torch.tensor(
                    [t for i in members for t in range(starts[i], starts[i] + extend_lens[i])],
                    dtype=torch.int64,
                    device=device,
                )
            groups.append(
                _build_group(
                    req_to_token,
                    [req_pool_indices[i] for i in members],
                    [seq_lens[i] for i in members],
                    [extend_lens[i] for i in members],
                    token_index,
                    device,
                )
            )
        metadata = cls(num_tokens, groups)
        for group in groups:
            for window in windows:
                group.mask(window)  # the per-layer path then only reads the cache
        return metadata


def _build_group(
    req_to_token: torch.Tensor,
    rows: list[int],
    seq_lens: list[int],
    extend_lens: list[int],
    token_index: torch.Tensor | None,
    device: torch.device | str,
) -> RequestGroup:
    b, max_q, max_kv = len(rows), max(extend_lens), max(seq_lens)
    seq = torch.tensor(seq_lens, dtype=torch.int64, device=device)[:, None]
    ext = torch.tensor(extend_lens, dtype=torch.int64, device=device)[:, None]
    row_t = torch.tensor(rows, dtype=torch.int64, device=device)
    slots = req_to_token.to(device)[row_t, :max_kv]
    # Table entries past seq_len may be stale or point at never-written slots; substitute a
    # slot the request owns so that padded keys are finite (0 * NaN would poison the output).
    k_pos = torch.arange(max_kv, device=device)
    slots = torch.where(k_pos < seq, slots, slots[:, :1]).reshape(-1)
    # Padded query rows take the last real position, so no row is fully masked (SDPA -> NaN).
    q_pos = torch.minimum(seq - ext + torch.arange(max_q, device=device), seq - 1)
    pad_index = None
    if min(extend_lens) != max_q:
        pad_index = torch.cat([torch.arange(e) + i * max_q for i, e in enumerate(extend_lens)])
        pad_index = pad_index.to(device)
    # Decodes of equal length see all their keys; lets SDPA skip the mask entirely.
    full = max_q == 1 and min(seq_lens) == max_kv
    return RequestGroup(b, max_q, max_kv, slots, token_index, pad_index, q_pos[:, :, None], full)


class AttentionBackend(ABC):
    """Paged attention over one rank's KV pool: metadata once per forward, `forward` per layer.

    A GPU backend would plan its kernel arguments (qo/kv indptr, page indices) in
    `init_forward_metadata` and call its paged kernel in `forward`.
    """

    def __init__(
        self, kv_pool: KVPool, req_to_token: ReqToTokenPool, windows: set[int | None]
    ) -> None:
        self.kv_pool = kv_pool
        self.req_to_token = req_to_token
        self.windows = windows  # the sliding windows the model's layers use (None: full)
        self.out_cache_loc = torch.zeros(0, dtype=torch.int64)

    @abstractmethod
    def init_forward_metadata(
        self,
        req_pool_indices: list[int],
        seq_lens: list[int],
        extend_lens: list[int],
        out_cache_loc: torch.Tensor,
    ) -> None:
        """seq_lens: KV length after this step (prefix included); extend_lens: new tokens."""

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer_id: int,
        scaling: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        """Write k/v [n, Hkv, d] to this step's slots, attend q [n, Hq, d]; returns [n, Hq, d]."""

    def has_decode(self) -> bool:
        """Whether this forward attends any 1-token query (a graph step is all decodes)."""
        return True

    @abstractmethod
    def forward_latent(
        self,
        q: torch.Tensor,
        latent: torch.Tensor,
        layer_id: int,
        scaling: float,
        v_dim: int,
        expand: Expand | None = None,
    ) -> torch.Tensor:
        """MLA: write latent rows [n, 1, D] to this step's slots and attend over the cached ones.

        Absorbed (`expand` None): multi-query attention with one KV head, q [n, H, D], the
        values being the rows' first `v_dim` columns; returns [n, H, v_dim]. Decompressed:
        `expand(rows [m, 1, D])` gives per-head (k [m, H, dk], v [m, H, dv]) and q is
        [n, H, dk]; returns [n, H, dv].
        """


class TorchNativeBackend(AttentionBackend):
    """All requests of a step in one padded SDPA call per group (decodes, extends)."""

    def __init__(
        self, kv_pool: KVPool, req_to_token: ReqToTokenPool, windows: set[int | None]
    ) -> None:
        super().__init__(kv_pool, req_to_token, windows)
        self.metadata: AttentionMetadata | None = None
        # Gather buffer for K and V, reused by every layer and step: a fresh allocation over
        # glibc's 32 MiB mmap threshold is page-faulted on each call (fp32 gather ~10x slower).
        self._workspace: torch.Tensor | None = None

    def init_forward_metadata(
        self,
        req_pool_indices: list[int],
        seq_lens: list[int],
        extend_lens: list[int],
        out_cache_loc: torch.Tensor,
    ) -> None:
        self.out_cache_loc = out_cache_loc
        self.metadata = AttentionMetadata.build(
            self.req_to_token.table,
            req_pool_indices,
            seq_lens,
            extend_lens,
            out_cache_loc.device,
            self.windows,
        )

    def has_decode(self) -> bool:
        md = self.metadata
        return md is None or not md.groups or any(g.max_q == 1 for g in md.groups)

    def _gather(self, g: RequestGroup, pool: torch.Tensor, half: int) -> torch.Tensor:
        """The pool rows of the group's keys, into half `half` (0: K or the MLA latent, 1: V) of
        the workspace."""
        n = g.kv_slots.numel()
        size = pool[0].numel() * n
        ws = self._workspace
        if ws is None or ws.numel() < 2 * size or ws.dtype != pool.dtype:
            ws = self._workspace = pool.new_empty(2 * size)
        out = ws[half * size : (half + 1) * size].view(n, *pool.shape[1:])
        # index_select is 3-4x faster than advanced indexing for this gather on CPU.
        return torch.index_select(pool, 0, g.kv_slots, out=out)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer_id: int,
        scaling: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        pool_k, pool_v = self.kv_pool.k[layer_id], self.kv_pool.v[layer_id]
        # index_copy_ is markedly faster than advanced-index assignment on CPU.
        pool_k.index_copy_(0, self.out_cache_loc, k)
        pool_v.index_copy_(0, self.out_cache_loc, v)
        return self._attend_groups(
            q,
            lambda g: (self._gather(g, pool_k, 0), self._gather(g, pool_v, 1)),
            scaling,
            sliding_window,
            v.shape[-1],
        )

    def forward_latent(
        self,
        q: torch.Tensor,
        latent: torch.Tensor,
        layer_id: int,
        scaling: float,
        v_dim: int,
        expand: Expand | None = None,
    ) -> torch.Tensor:
        pool = self.kv_pool.k[layer_id]
        pool.index_copy_(0, self.out_cache_loc, latent)

        def gather(g: RequestGroup) -> tuple[torch.Tensor, torch.Tensor]:
            rows = self._gather(g, pool, 0)
            return expand(rows) if expand is not None else (rows, rows[..., :v_dim])

        return self._attend_groups(q, gather, scaling, None, v_dim)

    def _attend_groups(
        self,
        q: torch.Tensor,
        gather: Callable[[RequestGroup], tuple[torch.Tensor, torch.Tensor]],
        scaling: float,
        sliding_window: int | None,
        v_dim: int,
    ) -> torch.Tensor:
        """Attend each request group over the K/V `gather` reads for it (metadata once)."""
        md = self.metadata
        if md is None:
            raise RuntimeError("init_forward_metadata must run before forward")
        if len(md.groups) == 1 and md.groups[0].token_index is None:
            g = md.groups[0]
            return _attend(g, q, *gather(g), scaling, sliding_window)
        out = q.new_empty((*q.shape[:2], v_dim))  # also the IDLE answer: no groups, 0 tokens
        for group in md.groups:
            assert group.token_index is not None
            q_g = q.index_select(0, group.token_index)
            o = _attend(group, q_g, *gather(group), scaling, sliding_window)
            out.index_copy_(0, group.token_index, o)
        return out


def _attend(
    g: RequestGroup,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scaling: float,
    window: Window,
) -> torch.Tensor:
    """q [n_group, Hq, d] and gathered k [B * max_kv, Hkv, d], v [B * max_kv, Hkv, dv]
    -> [n_group, Hq, dv]."""
    b, mq, mkv = g.batch_size, g.max_q, g.max_kv
    _, hq, d = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    gs = hq // hkv
    if g.pad_index is not None:
        q = q.new_zeros((b * mq, hq, d)).index_copy_(0, g.pad_index, q)
    # Query head h reads KV head h // gs: folding the gs heads of a KV head into query rows
    # avoids enable_gqa, which sends CPU SDPA to its slow math path (bf16: ~5x slower).
    qf = q.view(b, mq, hkv, gs, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, gs * mq, d)
    kf = k.view(b, mkv, hkv, d).transpose(1, 2)
    vf = v.view(b, mkv, hkv, dv).transpose(1, 2)
    o = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=g.mask(window, gs), scale=scaling)
    o = o.view(b, hkv, gs, mq, dv).permute(0, 3, 1, 2, 4).reshape(b * mq, hq, dv)
    return o if g.pad_index is None else o.index_select(0, g.pad_index)
