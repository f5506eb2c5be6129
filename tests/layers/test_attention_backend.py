"""Batched TorchNativeBackend against the per-request loop it replaces."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dpattn.kvcache.memory_pool import KVPool, ReqToTokenPool
from dpattn.layers.attention_backend import AttentionMetadata, TorchNativeBackend

torch.set_num_threads(2)

POOL, MAX_REQS, MAX_CTX, D = 1024, 12, 64, 16


def reference(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    table: torch.Tensor,
    rows: list[int],
    seq_lens: list[int],
    extend_lens: list[int],
    scaling: float,
    window: int | None,
) -> torch.Tensor:
    """The per-request loop of Attention._paged_attention (pool already written), in fp32."""
    out = torch.empty(q.shape, dtype=torch.float32)
    start = 0
    for row, seq_len, ext in zip(rows, seq_lens, extend_lens):
        slots = table[row, :seq_len]
        q_pos = torch.arange(seq_len - ext, seq_len)[:, None]
        k_pos = torch.arange(seq_len)[None, :]
        mask = k_pos <= q_pos
        if window:
            mask &= k_pos > q_pos - window
        o = F.scaled_dot_product_attention(
            q[start : start + ext].transpose(0, 1).float(),
            k_buf[slots].transpose(0, 1).float(),
            v_buf[slots].transpose(0, 1).float(),
            attn_mask=mask,
            scale=scaling,
            enable_gqa=True,
        )
        out[start : start + ext] = o.transpose(0, 1)
        start += ext
    return out


def make_case(
    rng: random.Random, n_req: int, hq: int, hkv: int, dtype: torch.dtype, decode_prob: float
) -> dict:
    """Random paged batch; unused pool slots and stale table entries point at NaN K/V."""
    torch.manual_seed(rng.randrange(2**31))
    k_pool = torch.full((POOL, hkv, D), float("nan"), dtype=dtype)
    v_pool = torch.full((POOL, hkv, D), float("nan"), dtype=dtype)
    # Stale rows: slots of requests long gone, never valid for the current ones.
    table = torch.randint(0, POOL, (MAX_REQS, MAX_CTX))
    free = torch.randperm(POOL)  # scattered, non-contiguous slots
    rows = rng.sample(range(MAX_REQS), n_req)
    seq_lens, extend_lens, out_loc, used = [], [], [], 0
    for row in rows:
        prefix = rng.randint(0, 40)
        decode = rng.random() < decode_prob
        ext = 1 if decode else rng.randint(1, 20)
        seq = prefix + ext
        slots = free[used : used + seq]
        used += seq
        table[row, :seq] = slots
        k_pool[slots[:prefix]] = torch.randn(prefix, hkv, D).to(dtype)
        v_pool[slots[:prefix]] = torch.randn(prefix, hkv, D).to(dtype)
        out_loc.append(slots[prefix:])
        seq_lens.append(seq)
        extend_lens.append(ext)
    n = sum(extend_lens)
    return dict(
        q=torch.randn(n, hq, D).to(dtype),
        k=torch.randn(n, hkv, D).to(dtype),
        v=torch.randn(n, hkv, D).to(dtype),
        k_pool=k_pool,
        v_pool=v_pool,
        table=table,
        rows=rows,
        seq_lens=seq_lens,
        extend_lens=extend_lens,
        out_loc=torch.cat(out_loc) if out_loc else torch.zeros(0, dtype=torch.int64),
    )


def make_backend(
    c: dict, declared: set[int | None], layers: int = 1
) -> tuple[TorchNativeBackend, KVPool]:
    """The backend over a KV pool whose every layer starts as the case's pool."""
    k_pool = c["k_pool"]
    pool = KVPool(0, 0, k_pool.shape[1], D, k_pool.dtype, torch.device("cpu"))
    pool.k = [k_pool.clone() for _ in range(layers)]
    pool.v = [c["v_pool"].clone() for _ in range(layers)]
    table = ReqToTokenPool(0, 0, torch.device("cpu"))
    table.table = c["table"]
    backend = TorchNativeBackend(pool, table, declared)
    backend.init_forward_metadata(c["rows"], c["seq_lens"], c["extend_lens"], c["out_loc"])
    return backend, pool


def check(c: dict, windows: list[int | None], dtype: torch.dtype) -> None:
    backend, pool = make_backend(c, set(windows), len(windows))
    scaling = D**-0.5
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    # Several "layers" share one metadata build, as in a real forward.
    for layer, window in enumerate(windows):
        out = backend.forward(c["q"], c["k"], c["v"], layer, scaling, window)
        k_pool, v_pool = pool.k[layer], pool.v[layer]
        assert out.shape == c["q"].shape and out.dtype == dtype
        assert torch.equal(k_pool[c["out_loc"]], c["k"])
        assert torch.equal(v_pool[c["out_loc"]], c["v"])
        ref = reference(
            c["q"],
            k_pool,
            v_pool,
            c["table"],
            c["rows"],
            c["seq_lens"],
            c["extend_lens"],
            scaling,
            window,
        )
        torch.testing.assert_close(out.float(), ref, atol=atol, rtol=atol)


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    n_req=st.integers(1, 8),
    ratio=st.sampled_from([1, 2, 4]),
    hkv=st.sampled_from([1, 2]),
    kind=st.sampled_from(["decode", "extend", "mixed"]),
    window=st.sampled_from([None, 3, 7]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_matches_reference(
    seed: int,
    n_req: int,
    ratio: int,
    hkv: int,
    kind: str,
    window: int | None,
    dtype: torch.dtype,
) -> None:
    rng = random.Random(seed)
    decode_prob = {"decode": 1.0, "extend": 0.0, "mixed": 0.5}[kind]
    c = make_case(rng, n_req, hkv * ratio, hkv, dtype, decode_prob)
    check(c, [window, None], dtype)


@pytest.mark.parametrize("window", [None, 3, 100])
def test_equal_length_decode_skips_mask(window: int | None) -> None:
    # Same-length decodes (full-mask fast path), with and without a window that bites.
    rows, seq = [0, 3, 5], 20
    table = torch.randperm(POOL)[: MAX_REQS * MAX_CTX].view(MAX_REQS, MAX_CTX)
    k_pool, v_pool = torch.randn(POOL, 1, D), torch.randn(POOL, 1, D)
    out_loc = table[rows, seq - 1]
    c = dict(
        q=torch.randn(3, 4, D),
        k=torch.randn(3, 1, D),
        v=torch.randn(3, 1, D),
        k_pool=k_pool,
        v_pool=v_pool,
        table=table,
        rows=rows,
        seq_lens=[seq] * 3,
        extend_lens=[1] * 3,
        out_loc=out_loc,
    )
    check(c, [window], torch.float32)
    md = AttentionMetadata.build(table, rows, [seq] * 3, [1] * 3, "cpu", {window})
    assert (md.groups[0].mask(window) is None) == (window != 3)


def test_empty_batch() -> None:
    md = AttentionMetadata.build(torch.zeros(4, 8, dtype=torch.int64), [], [], [], "cpu", {None})
    assert md.num_tokens == 0 and md.groups == []
    empty = torch.zeros(0, dtype=torch.int64)
    c = dict(
        k_pool=torch.zeros(8, 1, D),
        v_pool=torch.zeros(8, 1, D),
        table=torch.zeros(4, 8, dtype=torch.int64),
        rows=[],
        seq_lens=[],
        extend_lens=[],
        out_loc=empty,
    )
    backend, _ = make_backend(c, {None})
    out = backend.forward(
        torch.zeros(0, 4, D), torch.zeros(0, 1, D), torch.zeros(0, 1, D), 0, 1.0, None
    )
    assert out.shape == (0, 4, D)


def test_window_not_declared_at_build() -> None:
    # A window missing from `windows` is still honoured (mask built lazily, then cached).
    rng = random.Random(1)
    c = make_case(rng, 4, 4, 1, torch.float32, 0.5)
    backend, pool = make_backend(c, set())
    out = backend.forward(c["q"], c["k"], c["v"], 0, 0.25, 5)
    ref = reference(
        c["q"],
        pool.k[0],
        pool.v[0],
        c["table"],
        c["rows"],
        c["seq_lens"],
        c["extend_lens"],
        0.25,
        5,
    )
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
