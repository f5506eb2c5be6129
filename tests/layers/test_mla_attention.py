"""MLAAttention on the TorchNativeBackend: the absorbed form (query folded into the latent space
through w_kc, values lifted through w_vc after attention) equals the decompressed form (per-head
K/V expanded through kv_b_proj) to fp32 rounding, and both equal a float64 reference written
from the weights; over three forwards (extends, extends beside decodes, decodes) on a paged
latent pool, at attention TP 1 and 2 (the heads split, the latent replicated).

The "square" dims (kv_lora_rank == qk_nope_head_dim == v_head_dim) keep every wrong absorption
shape-compatible, so swapping w_kc and w_vc, or transposing either, fails on the values rather
than on a shape; the softmax scale is neither 1/sqrt(qk dim) nor 1/sqrt(latent width), so a
path that used its own scale fails too.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from dpattn.kvcache.memory_pool import KVPool, ReqToTokenPool
from dpattn.layers.attention_backend import TorchNativeBackend
from dpattn.layers.forward_context import ForwardContext, forward_context
from dpattn.layers.mla import MLAAttention
from dpattn.layers.rotary import Rotary
from dpattn.layers.weights import load_param

HIDDEN, HEADS, EPS, SCALE, THETA = 32, 4, 1e-6, 0.3, 10000.0
DIMS = {  # (kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim)
    "square": (16, 16, 8, 16),
    "uneven": (24, 16, 8, 12),
}
POOL, ROWS, CTX, PER_ROW = 48, 4, 16, 10  # PER_ROW: slots a request owns (its tokens)
CPU_PS = SimpleNamespace(device=torch.device("cpu"))  # all the forward context reads of it
# (request row, tokens this forward) per step: extends only (auto decompresses), extends beside
# decodes, then decodes only (auto absorbs both).
STEPS = [
    [(0, 7), (1, 5)],
    [(0, 1), (1, 3), (2, 6)],
    [(0, 1), (1, 1), (2, 1)],
]
ATOL = 1e-5


def full_weights(dims: tuple[int, int, int, int], q_lora: int | None) -> dict[str, torch.Tensor]:
    r, nope, rope, v = dims
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int, std: float = 0.3) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * std

    w = {
        "kv_a_proj_with_mqa": rand(r + rope, HIDDEN),
        "kv_a_layernorm.weight": 1 + rand(r, std=0.1),
        "kv_b_proj": rand(HEADS * (nope + v), r),
        "o_proj": rand(HIDDEN, HEADS * v),
    }
    if q_lora:
        w |= {
            "q_a_proj": rand(q_lora, HIDDEN),
            "q_a_layernorm.weight": 1 + rand(q_lora, std=0.1),
            "q_b_proj": rand(HEADS * (nope + rope), q_lora),
        }
    else:
        w["q_proj"] = rand(HEADS * (nope + rope), HIDDEN)
    return w


def inv_freq(rope: int) -> torch.Tensor:
    return 1.0 / THETA ** (torch.arange(0, rope, 2, dtype=torch.float64) / rope)


def make_layer(
    dims: tuple[int, int, int, int], q_lora: int | None, a: int, rank: int
) -> MLAAttention:
    r, nope, rope, v = dims
    ps = SimpleNamespace(attn_tp_size=a, attn_tp_rank=rank)
    rotary = Rotary(inv_freq(rope).float(), 1.0, interleaved=True)
    layer = MLAAttention(
        ps,  # type: ignore[arg-type]
        0,
        HIDDEN,
        HEADS,
        q_lora,
        r,
        nope,
        rope,
        v,
        rotary,
        SCALE,
        EPS,
        torch.float32,
    )
    full = full_weights(dims, q_lora)
    params = dict(layer.named_parameters())
    assert params.keys() == full.keys()
    for name, p in params.items():
        load_param(p, full[name])
    layer.post_load()
    return layer


def reference(
    w: dict[str, torch.Tensor], dims: tuple[int, int, int, int], x: torch.Tensor
) -> torch.Tensor:
    """Causal multi-head attention of one request's tokens x [L, HIDDEN] in float64, written
    from the checkpoint's weights (kv_b_proj expanded per head, nothing absorbed)."""
    r, nope, rope, v = dims
    w = {k: t.double() for k, t in w.items()}
    x, n = x.double(), x.shape[0]

    def rms(t: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + EPS) * g

    if "q_proj" in w:
        q = x @ w["q_proj"].T
    else:
        q = rms(x @ w["q_a_proj"].T, w["q_a_layernorm.weight"]) @ w["q_b_proj"].T
    q = q.view(n, HEADS, nope + rope)
    c_kv, k_pe = (x @ w["kv_a_proj_with_mqa"].T).split([r, rope], -1)
    kv = (rms(c_kv, w["kv_a_layernorm.weight"]) @ w["kv_b_proj"].T).view(n, HEADS, nope + v)
    k_nope, values = kv.split([nope, v], -1)

    def rotate(t: torch.Tensor) -> torch.Tensor:  # pairs (2i, 2i + 1) turned by angle pos * f_i
        angle = torch.arange(n, dtype=torch.float64)[:, None] * inv_freq(rope)[None, :]
        c, s = angle.cos()[:, None, :], angle.sin()[:, None, :]
        t1, t2 = t[..., 0::2], t[..., 1::2]
        return torch.cat([t1 * c - t2 * s, t2 * c + t1 * s], -1)

    q_pe, k_pe = rotate(q[..., nope:]), rotate(k_pe[:, None, :])
    scores = torch.einsum("ihd,jhd->hij", q[..., :nope], k_nope)
    scores = (scores + torch.einsum("ihd,jhd->hij", q_pe, k_pe.expand(n, HEADS, rope))) * SCALE
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    o = torch.einsum("hij,jhd->ihd", scores.softmax(-1), values)
    return o.reshape(n, HEADS * v) @ w["o_proj"].T


class Rank:
    """One attention-TP rank: its layer shard, its own (replicated) latent pool and backend."""

    def __init__(self, layer: MLAAttention, slots: torch.Tensor) -> None:
        self.layer = layer
        self.pool = KVPool(POOL, 1, 1, layer.head_dim, torch.float32, torch.device("cpu"), 0)
        assert self.pool.is_latent
        self.pool.k[0][:] = float("nan")  # a read of a slot no request wrote poisons the output
        table = ReqToTokenPool(ROWS, CTX, torch.device("cpu"))
        table.table[:] = torch.randint(0, POOL, (ROWS, CTX), generator=torch.Generator())
        table.table[:, :PER_ROW] = slots
        self.backend = TorchNativeBackend(self.pool, table, {None})

    def forward(
        self, mode: str, step: list[tuple[int, int]], lens: list[int], x: torch.Tensor
    ) -> torch.Tensor:
        rows = [row for row, _ in step]
        extend = [e for _, e in step]
        seq = [lens[row] + e for row, e in step]
        out_loc = torch.cat(
            [
                self.backend.req_to_token.table[row, s - e : s]
                for row, e, s in zip(rows, extend, seq)
            ]
        )
        positions = torch.cat([torch.arange(s - e, s) for e, s in zip(extend, seq)])
        self.backend.init_forward_metadata(rows, seq, extend, out_loc)
        self.layer.mode = mode
        ctx = ForwardContext(None, CPU_PS, self.backend, None)  # type: ignore[arg-type]
        with forward_context(ctx), torch.inference_mode():
            return self.layer(positions, x)


@pytest.mark.parametrize("q_lora", [20, None], ids=["q_lora", "q_proj"])
@pytest.mark.parametrize("dims", DIMS.values(), ids=DIMS.keys())
@pytest.mark.parametrize("a", [1, 2])
def test_absorbed_equals_decompressed(
    dims: tuple[int, int, int, int], q_lora: int | None, a: int
) -> None:
    torch.manual_seed(0)
    slots = torch.randperm(POOL)[: ROWS * PER_ROW].view(ROWS, PER_ROW)  # scattered slots
    ranks = [Rank(make_layer(dims, q_lora, a, rank), slots) for rank in range(a)]
    full = full_weights(dims, q_lora)
    tokens = torch.randn(ROWS, PER_ROW, HIDDEN)  # each request's hidden states, by position
    lens = [0] * ROWS
    for i, step in enumerate(STEPS):
        x = torch.cat([tokens[row, lens[row] : lens[row] + e] for row, e in step])
        partials = {}
        for mode in ("absorbed", "decompressed", "auto"):
            partials[mode] = [rank.forward(mode, step, lens, x) for rank in ranks]
            for p in partials[mode]:
                assert p.isfinite().all()
        for absorbed, decompressed in zip(partials["absorbed"], partials["decompressed"]):
            torch.testing.assert_close(absorbed, decompressed, atol=ATOL, rtol=0)
        # auto: decompressed when the forward has no decode, absorbed otherwise (bit for bit)
        auto_is = "decompressed" if i == 0 else "absorbed"
        for got, want in zip(partials["auto"], partials[auto_is]):
            assert torch.equal(got, want), f"step {i}: auto is not {auto_is}"
        for row, e in step:
            lens[row] += e
        # o_proj is split by input column: the ranks' partial outputs sum to the layer's
        ref = torch.cat(
            [reference(full, dims, tokens[row, : lens[row]])[-e:] for row, e in step]
        ).float()
        for mode in ("absorbed", "decompressed"):
            got = torch.stack(partials[mode]).sum(0)
            torch.testing.assert_close(got, ref, atol=ATOL, rtol=0, msg=f"step {i} {mode}")


def test_post_load_splits_kv_b_proj_per_head() -> None:
    """w_kc [h, nope, R] and w_vc [h, R, v] are kv_b_proj's key and value rows of each head."""
    dims = DIMS["uneven"]
    r, nope, _, v = dims
    layer = make_layer(dims, None, 2, 1)  # rank 1's heads: 2 and 3
    kv_b = full_weights(dims, None)["kv_b_proj"].view(HEADS, nope + v, r)
    assert layer.w_kc is not None and layer.w_vc is not None
    assert torch.equal(layer.w_kc, kv_b[2:, :nope])
    assert torch.equal(layer.w_vc, kv_b[2:, nope:].transpose(1, 2))


def test_softmax_scale_is_the_layers() -> None:
    """Both forms use the scale the layer was built with (not the latent's nor the head's)."""
    dims = DIMS["square"]
    layer = make_layer(dims, None, 1, 0)
    seen = []
    slots = torch.arange(POOL)[: ROWS * PER_ROW].view(ROWS, PER_ROW)
    rank = Rank(layer, slots)
    original = F.scaled_dot_product_attention

    def spy(*args, **kw):  # type: ignore[no-untyped-def]
        seen.append(kw["scale"])
        return original(*args, **kw)

    x = torch.randn(3, HIDDEN)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(F, "scaled_dot_product_attention", spy)
        for mode in ("absorbed", "decompressed"):
            rank.forward(mode, [(0, 3)], [0] * ROWS, x)
    assert seen == [SCALE, SCALE]
