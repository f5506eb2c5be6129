"""Quantized projection weights (layers/quant.py): the formats, the int4 kernel against the dense
weight it claims to compute with, and the one place a projection's format is chosen."""

from __future__ import annotations

import logging

import pytest
import torch

from dpattn.layers.linear import embedding, linear, lookup_table, pack_weight
from dpattn.layers.quant import (
    INT4_MAX_ROWS,
    GroupQuant,
    Int4Weight,
    WeightFormat,
    effective,
    quantize,
    weight_format,
)

CPU_INT4 = WeightFormat("int4", 32, dense_prepack=True, int4_kernel=True)


def _kernel_vs_effective(gq: GroupQuant, rows: int = 5) -> float:
    """max |kernel - x_bf16 @ effective.T| relative to the output's size."""
    x = torch.randn(rows, gq.q.shape[1])
    out = Int4Weight(gq)(x)
    ref = x.bfloat16().double() @ effective(gq).dequantize().double().t()
    return float((out.double() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(64, 256), (40, 128), (3, 64)])  # N not a multiple of 16 too
@pytest.mark.parametrize("rows", [5, INT4_MAX_ROWS + 12])  # the int4 kernel; the batch path
def test_int4_kernel_computes_with_its_effective_weight(
    bits: int, shape: tuple[int, int], rows: int
) -> None:
    torch.manual_seed(0)
    gq = quantize(torch.randn(shape), bits, 32)
    # bf16 rounding only: a wrong nibble, scale or offset is off by far more than 2^-8
    assert _kernel_vs_effective(gq, rows) < 2**-7


def test_quantize_error_and_ranges() -> None:
    torch.manual_seed(0)
    w = torch.randn(32, 128)
    q4, q8 = quantize(w, 4, 32), quantize(w, 8, 64)
    assert q4.q.min() >= 0 and q4.q.max() <= 15 and q4.zero is not None
    assert q8.q.abs().max() <= 127 and q8.zero is None
    assert q4.scale.shape == (32, 4) and q8.scale.shape == (32, 2)
    # within half a step of each group's grid
    assert torch.all((q4.dequantize() - w).abs() <= q4.scale.repeat_interleave(32, 1) * 0.51)
    assert torch.all((q8.dequantize() - w).abs() <= q8.scale.repeat_interleave(64, 1) * 0.51)
    # the scales are bf16 values already: the kernel computes with exactly these weights
    assert torch.equal(effective(q4).dequantize(), q4.dequantize())
    assert torch.equal(effective(q8).dequantize(), q8.dequantize())
    with pytest.raises(ValueError, match="group size 48 does not divide the input width 128"):
        quantize(w, 4, 48)


@pytest.mark.parametrize(
    ("lo", "hi", "nibbles"), [(0, 15, 1), (-8, 7, 1), (-16, 15, 2), (-128, 127, 2), (0, 31, 2)]
)
def test_value_ranges_keep_every_value(lo: int, hi: int, nibbles: int) -> None:
    """GGUF's types: 4-bit unsigned (Q4_K) or signed (Q4_0), 5-bit (Q5_0 / Q5_1), 8-bit (Q8_0).
    Values stay exact; only scales and offsets round to bf16."""
    torch.manual_seed(1)
    q = torch.randint(lo, hi + 1, (32, 96), dtype=torch.int8)
    scale = torch.rand(32, 3) * 0.1 + 1e-3
    zero = None if lo < 0 else -torch.rand(32, 3) * 0.1
    gq = GroupQuant(q, scale, zero, 32)
    assert Int4Weight(gq).nibbles == nibbles
    exact = gq.dequantize()
    # bf16 scales: relative 2^-9 of each weight's size (plus the offset's rounding)
    assert torch.allclose(effective(gq).dequantize(), exact, rtol=2**-8, atol=2**-8)
    assert _kernel_vs_effective(gq) < 2**-7
    assert _kernel_vs_effective(gq, INT4_MAX_ROWS + 1) < 2**-7


def test_mutated_weights_are_caught() -> None:
    """The kernel check above fails when the packed weight is not the one claimed."""
    torch.manual_seed(2)
    gq = quantize(torch.randn(32, 64), 8, 32)
    wrong = GroupQuant(gq.q, gq.scale * 1.05, gq.zero, 32)
    x = torch.randn(4, 64)
    ref = x.bfloat16().double() @ effective(gq).dequantize().double().t()
    err = float((Int4Weight(wrong)(x).double() - ref).abs().max() / ref.abs().max())
    assert err > 2**-6


def test_empty_and_batched_inputs() -> None:
    w = Int4Weight(quantize(torch.randn(16, 64), 4, 32))
    assert w(torch.randn(0, 64)).shape == (0, 16)
    x = torch.randn(2, 3, 64)
    assert torch.equal(w(x), w(x.reshape(6, 64)).reshape(2, 3, 16))
    bias = torch.randn(16)
    assert torch.equal(linear(x[0], w, bias), w(x[0]) + bias)


def test_pack_weight_chooses_the_format(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(3)
    w = torch.randn(32, 64)
    with weight_format(CPU_INT4):
        assert isinstance(pack_weight(w), Int4Weight)
        assert pack_weight(w, quantize=False).is_mkldnn  # a router: dense, packed
        qkv = pack_weight(w[:16], w[16:])  # row-stacked, as attention's q, k and v
        assert isinstance(qkv, Int4Weight) and qkv.shape == (32, 64)
    with weight_format(WeightFormat("none", dense_prepack=True)):
        assert pack_weight(w).is_mkldnn
    with weight_format(WeightFormat("int8", 32, dense_prepack=False, int4_kernel=False)):
        caplog.set_level(logging.WARNING)
        dense = pack_weight(w)  # no kernel (e.g. on a GPU): the quantized values, dense
        assert torch.equal(dense, quantize(w, 8, 32).dequantize())


def test_gguf_weights_and_lookup() -> None:
    """A GGUF parameter carries its integer shard: packed when the kernel takes its group, dense
    (its exact values, filled on demand) when not; lookups dequantize only the rows taken."""
    torch.manual_seed(4)
    fmt = WeightFormat("gguf", dense_prepack=True, int4_kernel=True)
    q8 = GroupQuant(
        torch.randint(-128, 128, (48, 64), dtype=torch.int8), torch.rand(48, 2), None, 32
    )
    p = torch.nn.Parameter(torch.empty(48, 64), requires_grad=False)
    p.group_quant = q8  # type: ignore[attr-defined]
    with weight_format(fmt):
        assert isinstance(pack_weight(p), Int4Weight)
        table = lookup_table(p)
    ids = torch.tensor([3, 0, 47])
    assert torch.equal(embedding(ids, table), q8.dequantize()[ids])
    q6 = GroupQuant(torch.randint(-32, 32, (16, 64), dtype=torch.int8), torch.rand(16, 4), None, 16)
    p6 = torch.nn.Parameter(torch.empty(16, 64), requires_grad=False)
    p6.group_quant = q6  # type: ignore[attr-defined]
    with weight_format(WeightFormat("gguf", dense_prepack=False, int4_kernel=True)):
        dense = pack_weight(p6)  # Q6_K's groups of 16: no kernel, the exact values
    assert torch.equal(dense, q6.dequantize())


def test_packed_in_row_blocks() -> None:
    """A weight taller than one packing block (packed 4,096 rows at a time, the last partial)."""
    torch.manual_seed(5)
    gq = GroupQuant(
        torch.randint(-128, 128, (9000, 64), dtype=torch.int8), torch.rand(9000, 2), None, 32
    )
    assert _kernel_vs_effective(gq) < 2**-7


@pytest.mark.parametrize("bits", [4, 8])
def test_dense_batch_path(bits: int) -> None:
    """batch_path "dense": batches past the int4 kernel's rows run on an fp32 prepacked copy of
    the effective weight (fp32 arithmetic, so far tighter than the kernel's bf16 bound); the
    kernel keeps the rows it is faster at, and no values are kept for dequantizing."""
    torch.manual_seed(6)
    weight = torch.randn(40, 128)
    gq = quantize(weight, bits, 32)
    fmt = WeightFormat(f"int{bits}", 32, dense_prepack=True, int4_kernel=True, batch_path="dense")
    with weight_format(fmt):
        w = pack_weight(weight)
    assert isinstance(w, Int4Weight) and w.batch_weight is not None and w.values is None
    assert w.max_rows == (4 if bits == 4 else 1)
    ref_w = effective(gq).dequantize().double()
    x = torch.randn(w.max_rows + 3, 128)
    out = linear(x, w)
    ref = x.double() @ ref_w.t()
    assert float((out.double() - ref).abs().max() / ref.abs().max()) < 1e-6
    small = x[: w.max_rows]  # the int4 kernel: bf16 activations
    assert torch.equal(linear(small, w), w(small))
    assert not torch.equal(linear(small, w), out[: w.max_rows])
