"""MoE routing (expert-sorted GEMMs, padding rows never routed) and the shared linear()."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from dpattn.layers.dp_attention import GatherPlan, PaddingMode, choose_padding_mode
from dpattn.layers.forward_context import ForwardContext, forward_context
from dpattn.layers.linear import SKINNY_ROWS, can_prepack, linear, pack_weight, packed_rows
from dpattn.layers.moe import MoE, Routing

H, INTER, E, TOP_K = 16, 8, 4, 2


def make_moe(tp: int = 1, rank: int = 0, ep: bool = False, dtype=torch.float32) -> MoE:
    ps = SimpleNamespace(tp_size=tp, rank=rank)
    moe = MoE(ps, H, INTER, E, Routing(TOP_K, True), "silu", dtype, ep)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(0)
    for p in moe.parameters():
        p.data.copy_(torch.randn(p.shape, generator=gen).to(dtype) / 4)
    return moe


def reference_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The per-expert loop the sorted version replaced (all experts local)."""
    probs = F.softmax(F.linear(x, moe.gate).float(), dim=-1)
    weights, experts = torch.topk(probs, moe.top_k, dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
    out = torch.zeros_like(x)
    for e in range(moe.local_experts):
        tok, slot = torch.where(experts == moe.first_expert + e)
        gate, up = F.linear(x[tok], moe.w13[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, moe.w2[e]) * weights[tok, slot, None]
        out.index_add_(0, tok, y)
    return out


CPU_PS = SimpleNamespace(device=torch.device("cpu"))  # all a layer-level context reads of it


def run(moe: MoE, x: torch.Tensor, real_rows: torch.Tensor | None) -> torch.Tensor:
    ctx = ForwardContext(None, CPU_PS, None, real_rows)  # type: ignore[arg-type]
    with forward_context(ctx), torch.inference_mode():
        return moe(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ep_rank", [None, 0, 1])
def test_sorted_routing_equals_per_expert_loop(dtype: torch.dtype, ep_rank: int | None) -> None:
    moe = (
        make_moe(2, ep_rank, ep=True, dtype=dtype) if ep_rank is not None else make_moe(dtype=dtype)
    )
    x = torch.randn(13, H).to(dtype)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(run(moe, x, None), reference_moe(moe, x), atol=tol, rtol=tol)


def test_padding_rows_never_reach_an_expert(monkeypatch: pytest.MonkeyPatch) -> None:
    # D = 2, A = 2, MAX_LEN: group 0 has 3 real rows of 4, group 1 one real row of 4.
    plan = GatherPlan.build([3, 1], 2, override="max_len")
    real = plan.real_rows()
    assert real is not None and real.tolist() == [0, 1, 2, 4]
    moe = make_moe(2, 0, ep=True)  # rank 0 holds experts 0 and 1: where padding used to land
    seen: list[int] = []

    def spy_on(m: MoE) -> None:
        experts = m._experts

        def spy(xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
            seen.append(int(counts.sum()))
            return experts(xs, counts)

        monkeypatch.setattr(m, "_experts", spy)

    spy_on(moe)
    x = torch.randn(plan.total, H)
    x[plan.total - 1] = 0  # padding rows are zeros in the gathered buffer
    out = run(moe, x, real)
    pad = [i for i in range(plan.total) if i not in real.tolist()]
    assert torch.count_nonzero(out[pad]) == 0
    full = make_moe()  # all experts local: every (token, expert) pair of the real rows, no more
    spy_on(full)
    seen.clear()
    run(full, x, real)
    assert seen == [len(real) * TOP_K]
    torch.testing.assert_close(run(moe, x, real)[real], reference_moe(moe, x[real]))


def test_real_rows_tile_each_group_slot() -> None:
    assert GatherPlan.build([4, 4], 1).real_rows() is None  # no padding at all
    plan = GatherPlan.build([3, 0, 5], 2, override="sum_len")
    assert plan.real_rows().tolist() == [0, 1, 2, 4, 5, 6, 7, 8]  # type: ignore[union-attr]


def test_padding_mode_follows_the_collectives_the_backend_runs() -> None:
    # D == 1: always the plain TP all-reduce (SUM_LEN), whatever the padding
    assert GatherPlan.build([3], 2).mode is PaddingMode.SUM_LEN
    assert GatherPlan.build([3], 2, graph=True).mode is PaddingMode.MAX_LEN
    balanced = [4, 4, 4, 4]
    # native reduce-scatter (NCCL): the all-gather of D*P rows beats ~2*sum(p)
    assert choose_padding_mode(balanced, False, attn_tp_size=2) is PaddingMode.MAX_LEN
    # emulated reduce-scatter (gloo) at A > 1: two extra collectives, SUM_LEN
    assert (
        choose_padding_mode(balanced, False, attn_tp_size=2, native_reduce_scatter=False)
        is PaddingMode.SUM_LEN
    )
    # ... at A == 1: MAX_LEN only when 3*D*P <= 4*sum(p)
    emulated = dict(attn_tp_size=1, native_reduce_scatter=False)
    assert choose_padding_mode(balanced, False, **emulated) is PaddingMode.MAX_LEN
    assert choose_padding_mode([4, 4, 0, 0], False, **emulated) is PaddingMode.SUM_LEN


@pytest.mark.parametrize("rows", [1, 2, 16, SKINNY_ROWS, SKINNY_ROWS + 1])
@pytest.mark.parametrize("out_features", [24, 40_000])
def test_linear_equals_f_linear(rows: int, out_features: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 32, generator=gen)
    w = torch.randn(out_features, 32, generator=gen)
    b = torch.randn(out_features, generator=gen)
    torch.testing.assert_close(linear(x, w), F.linear(x, w), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    assert linear(x, w).is_contiguous()


@pytest.mark.skipif(not can_prepack(torch.device("cpu")), reason="torch built without oneDNN")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [0, 1, 16, 200])
def test_prepacked_linear_equals_f_linear(dtype: torch.dtype, rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 48, generator=gen).to(dtype)
    w = torch.randn(1000, 48, generator=gen).to(dtype)
    b = torch.randn(1000, generator=gen).to(dtype)
    packed = pack_weight(w)
    assert packed.is_mkldnn and packed.dtype == torch.float32 and packed.shape == w.shape
    # a bf16 weight stays beside its copy, for one row (linear reads it there)
    assert (getattr(packed, "plain", None) is not None) == (dtype == torch.bfloat16)
    # bf16: the products of the bf16 values accumulated in fp32, rounded once (a native kernel)
    ref = F.linear(x.float(), w.float()).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    out = linear(x, packed)
    assert out.dtype == dtype and out.shape == (rows, 1000)
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    torch.testing.assert_close(linear(x, packed, b), ref + b, atol=tol, rtol=tol)


def test_packed_row_counts_are_few_and_close() -> None:
    """Up to 16 rows exactly; above, at most 12.5% padding and 8 sizes per doubling: 88 GEMM
    shapes per weight for every row count up to 8192 (oneDNN caches one primitive per shape)."""
    sizes = [packed_rows(m) for m in range(8193)]
    assert sizes[:17] == list(range(17))
    assert all(m <= b <= m * 1.125 for m, b in enumerate(sizes))
    assert all(packed_rows(b) == b for b in sizes)  # a bucket is its own bucket
    assert sizes == sorted(sizes)
    assert len(set(sizes[1:])) == 88 and len(set(sizes[1:513])) == 56
    assert {packed_rows(m) for m in (64, 128, 256, 512)} == {64, 128, 256, 512}


@pytest.mark.skipif(not can_prepack(torch.device("cpu")), reason="torch built without oneDNN")
def test_prepacked_gemm_runs_on_bucketed_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every row count reaches oneDNN as its bucket, the real rows followed by zero rows; the
    real rows' outputs equal F.linear and come back contiguous."""
    inputs: list[torch.Tensor] = []
    gemm = torch.ops.mkldnn._linear_pointwise

    def spy(x: torch.Tensor, *args: object) -> torch.Tensor:
        inputs.append(x)
        return gemm(x, *args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", spy)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(40, 24, generator=gen)
    packed = pack_weight(w)
    for rows in range(1, 140):
        x = torch.randn(rows, 24, generator=gen)
        out = linear(x, packed)
        assert out.shape == (rows, 40) and out.is_contiguous()
        torch.testing.assert_close(out, F.linear(x, w), atol=1e-5, rtol=1e-5)
        sent = inputs[-1]
        assert sent.shape[0] == packed_rows(rows)
        assert torch.equal(sent[:rows], x) and not sent[rows:].any()
    assert len({x.shape[0] for x in inputs}) == 16 + 8 * 3 + 1  # 1-16, to 128 by 8ths, 144


@pytest.mark.skipif(not can_prepack(torch.device("cpu")), reason="torch built without oneDNN")
def test_prepacked_attention_projections_equal_plain() -> None:
    """q, k, v fused into one packed GEMM (with biases) give the plain projections."""
    from dpattn.layers.attention import Attention
    from dpattn.layers.rotary import Rotary

    class Echo:  # stands in for the attention backend: an output that depends on q, k and v
        def forward(self, q, k, v, layer_id, scaling, window):  # noqa: ANN001, ANN201
            return q + k.mean(1, keepdim=True) - v.mean(1, keepdim=True)

    ps = SimpleNamespace(attn_tp_size=1, attn_tp_rank=0)
    rotary = Rotary(1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8)))
    attn = Attention(ps, 0, 24, 4, 2, 8, rotary, torch.float32, 1e-6, bias=True)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(0)
    for p in attn.parameters():
        p.data.copy_(torch.randn(p.shape, generator=gen) / 4)
    x, pos = torch.randn(5, 24, generator=gen), torch.arange(5)

    def run() -> torch.Tensor:
        with forward_context(ForwardContext(None, CPU_PS, Echo(), None)), torch.inference_mode():  # type: ignore[arg-type]
            return attn(pos, x)

    plain = run()
    attn.prepack()
    assert attn.qkv_proj is not None and attn.qkv_proj.is_mkldnn and attn.o_proj.is_mkldnn
    assert not any(n in dict(attn.named_parameters()) for n in ("q_proj", "k_bias", "o_proj"))
    torch.testing.assert_close(run(), plain, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not can_prepack(torch.device("cpu")), reason="torch built without oneDNN")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lookup", [True, False])
def test_packed_lm_head_and_its_one_row_path(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, lookup: bool
) -> None:
    """After prepack the LM head computes from the packed copy, except one row of a bf16 head,
    which reads its plain rows (half the bytes): a tied head's are the lookup's own, no copy.
    Both equal F.linear."""
    from dpattn.layers import linear as linear_mod
    from dpattn.layers.embedding import VocabParallelEmbedding

    ps = SimpleNamespace(attn_tp_size=1, attn_tp_rank=0)
    emb = VocabParallelEmbedding(ps, 300, 32, dtype, lookup=lookup)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(0)
    emb.weight.data.copy_(torch.randn(300, 32, generator=gen).to(dtype))
    w = emb.weight.detach().clone()
    emb.prepack()
    assert emb.head is not None and emb.head.is_mkldnn
    plain = getattr(emb.head, "plain", None)
    assert (plain is not None) == (dtype == torch.bfloat16)
    if plain is not None and lookup:
        assert plain.data_ptr() == emb.weight.data_ptr()
    seen: list[int] = []  # rows of each call that read the plain rows

    def spy(x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        seen.append(x.shape[0])
        return F.linear(x, wt, bias)

    monkeypatch.setattr(linear_mod, "F", SimpleNamespace(linear=spy))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for rows in (1, 2, 16):
        x = torch.randn(rows, 32, generator=gen).to(dtype)
        with torch.inference_mode():
            out = emb.logits(x)
        torch.testing.assert_close(
            out, F.linear(x.float(), w.float()).to(dtype), atol=tol, rtol=tol
        )
    assert seen == ([1] if dtype == torch.bfloat16 else [])
