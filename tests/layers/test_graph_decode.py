"""The pieces a CUDA graph records, run eagerly on CPU: decode attention over static buffers
(padded batch and KV bucket) against the per-request reference, and the sync-free MoE routing
against the sorted one. The graph capture and replay themselves are checked in tests/gpu."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from dpattn.kvcache.memory_pool import KVPool, ReqToTokenPool
from dpattn.layers.graph_attention_backend import GraphDecodeBackend
from dpattn.layers.moe import MoE, Routing

POOL, ROWS, CTX, HQ, HKV, D = 64, 6, 32, 4, 2, 8
CPU = torch.device("cpu")


def reference(q, k_pool, v_pool, slots_per_req, window):  # type: ignore[no-untyped-def]
    """One decode query per request over its own slots, fp32, causal by construction."""
    outs = []
    for i, slots in enumerate(slots_per_req):
        if window:
            slots = slots[-window:]
        o = F.scaled_dot_product_attention(
            q[i : i + 1].transpose(0, 1).float(),
            k_pool[slots].transpose(0, 1).float(),
            v_pool[slots].transpose(0, 1).float(),
            scale=D**-0.5,
            enable_gqa=True,
        )
        outs.append(o.transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("n,bs,kv_len", [(3, 4, 16), (3, 3, 32), (0, 2, 16)])
def test_static_decode_attention(window: int | None, n: int, bs: int, kv_len: int) -> None:
    torch.manual_seed(0)
    pool = KVPool(POOL, 1, HKV, D, torch.float32, CPU)
    # Unowned slots hold NaN: a padded key that read one would poison its row.
    pool.k[0][:POOL] = float("nan")
    pool.v[0][:POOL] = float("nan")
    table = ReqToTokenPool(ROWS, CTX, CPU)
    table.table[:] = torch.randint(0, POOL, (ROWS, CTX))  # stale entries past each length
    seq_lens = [5, 11, 1][:n]
    perm, used, slots_per_req, out_loc = torch.randperm(POOL), 0, [], []
    for row, seq in enumerate(seq_lens):
        slots = perm[used : used + seq]
        used += seq
        table.table[row, :seq] = slots
        pool.k[0][slots[:-1]] = torch.randn(seq - 1, HKV, D)
        pool.v[0][slots[:-1]] = torch.randn(seq - 1, HKV, D)
        slots_per_req.append(slots)
        out_loc.append(slots[-1:])
    backend = GraphDecodeBackend(pool, table, {window}, max_bs=4, max_kv=32)
    out_cache_loc = torch.cat(out_loc) if out_loc else torch.zeros(0, dtype=torch.int64)
    backend.fill(bs, kv_len, list(range(n)), seq_lens, out_cache_loc)
    backend.prepare(bs, kv_len)
    q, k, v = torch.randn(bs, HQ, D), torch.randn(bs, HKV, D), torch.randn(bs, HKV, D)
    before = pool.k[0].clone()
    out = backend.forward(q, k, v, 0, D**-0.5, window)
    assert out.shape == (bs, HQ, D) and torch.isfinite(out).all()  # padding rows too
    if n:
        torch.testing.assert_close(
            out[:n], reference(q, pool.k[0], pool.v[0], slots_per_req, window), atol=1e-5, rtol=0
        )
    # Real rows wrote their own slots; padding rows wrote only the pad slot; nothing else moved.
    assert torch.equal(pool.k[0][out_cache_loc], k[:n])
    changed = ~((pool.k[0] == before) | (pool.k[0].isnan() & before.isnan())).all(dim=(1, 2))
    allowed = set(out_cache_loc.tolist()) | ({pool.pad_slot} if bs > n else set())
    assert set(changed.nonzero().flatten().tolist()) <= allowed


@pytest.mark.parametrize("n,bs,kv_len", [(3, 4, 16), (0, 2, 16)])
def test_static_latent_decode_equals_the_native_backend(n: int, bs: int, kv_len: int) -> None:
    """MLA's absorbed decode over static buffers: one latent KV head, values its first R
    columns, the same rows as TorchNativeBackend.forward_latent attends."""
    from dpattn.layers.attention_backend import TorchNativeBackend

    torch.manual_seed(0)
    r, rope = 12, 4
    pools = [KVPool(POOL, 1, 1, r + rope, torch.float32, CPU, v_head_dim=0) for _ in range(2)]
    assert pools[0].is_latent and pools[0].layer_buffers(0) == [pools[0].k[0]]
    rows = torch.randn(POOL + 1, 1, r + rope)
    table = ReqToTokenPool(ROWS, CTX, CPU)
    seq_lens = [5, 11, 1][:n]
    perm, used = torch.randperm(POOL), 0
    for row, seq in enumerate(seq_lens):
        table.table[row, :seq] = perm[used : used + seq]
        used += seq
    out_loc = torch.stack([table.table[i, s - 1] for i, s in enumerate(seq_lens)]) if n else None
    out_cache_loc = out_loc if out_loc is not None else torch.zeros(0, dtype=torch.int64)
    graph = GraphDecodeBackend(pools[0], table, {None}, max_bs=4, max_kv=32)
    graph.fill(bs, kv_len, list(range(n)), seq_lens, out_cache_loc)
    graph.prepare(bs, kv_len)
    native = TorchNativeBackend(pools[1], table, {None})
    native.init_forward_metadata(list(range(n)), seq_lens, [1] * n, out_cache_loc)
    q, latent = torch.randn(bs, HQ, r + rope), torch.randn(bs, 1, r + rope)
    for pool in pools:
        pool.k[0].copy_(rows)
    out = graph.forward_latent(q, latent, 0, 0.3, r)
    assert out.shape == (bs, HQ, r) and torch.isfinite(out).all()
    ref = native.forward_latent(q[:n], latent[:n], 0, 0.3, r)
    torch.testing.assert_close(out[:n], ref, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="absorbed"):
        graph.forward_latent(q, latent, 0, 0.3, r, expand=lambda x: (x, x))


def test_static_moe_routing_equals_the_sorted_one() -> None:
    """The CUDA path (every local expert, weighted; no host read) on CPU tensors."""
    h, inter, experts, top_k = 16, 8, 4, 2
    for ep_rank in (None, 0, 1):
        ps = SimpleNamespace(tp_size=1 if ep_rank is None else 2, rank=ep_rank or 0)
        ep = ep_rank is not None
        moe = MoE(ps, h, inter, experts, Routing(top_k, True), "silu", torch.float32, ep)  # type: ignore[arg-type]
        gen = torch.Generator().manual_seed(0)
        for p in moe.parameters():
            p.data.copy_(torch.randn(p.shape, generator=gen) / 4)
        x = torch.randn(9, h, generator=gen)
        probs = F.softmax(F.linear(x, moe.gate), dim=-1)
        weights, chosen = torch.topk(probs, top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        with torch.inference_mode():
            torch.testing.assert_close(
                moe._route_static(x, weights, chosen), moe._route(x), atol=1e-6, rtol=1e-5
            )
