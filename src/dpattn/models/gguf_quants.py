"""Split GGUF quantized tensors into integer values plus a per-group scale and offset.

`split_gguf` decodes the block layouts of the linear GGML quant types (vectorised numpy) into a
`GroupQuant`: int8 values `q`, an fp32 `scale` and an optional fp32 `zero` per group of `group`
consecutive inputs. `q`, `scale` and `zero` are chosen so that fp32 `scale * q + zero`
reproduces `gguf.quants.dequantize` bit for bit: every scale is formed exactly as gguf-py forms
it (K-quants: fp16 super-scale times 6-bit or int8 sub-scale, an exact product in fp32), and
the offsets of signed types are folded into `q` rather than into `zero`.

Per type (q range, group, zero):
    Q8_0 [-128, 127] 32 None         Q4_0 [-8, 7]   32 None       Q5_0 [-16, 15] 32 None
    Q4_1 [0, 15]     32 m            Q5_1 [0, 31]   32 m
    Q2_K [0, 3]      16 -(dmin*m)    Q3_K [-4, 3]   16 None       Q6_K [-32, 31] 16 None
    Q4_K [0, 15]     32 -(dmin*m)    Q5_K [0, 31]   32 -(dmin*m)
The codebook types (IQ*, TQ*, MXFP4...) have no such split: `split_gguf` returns None for them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from dpattn.layers.quant import GroupQuant

T = GGMLQuantizationType
# (q int8 [blocks, block_size], scale f32 [blocks, groups per block], zero or None)
Decoded = tuple[np.ndarray, np.ndarray, np.ndarray | None]


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 field at byte `at` of each block, as fp32 [blocks, 1] (exact widening)."""
    return np.ascontiguousarray(blocks[:, at : at + 2]).view(np.float16).astype(np.float32)


def _fields(b: np.ndarray, width: int) -> np.ndarray:
    """Unpack `width`-bit fields of bytes [..., n] into [..., 8 // width, n], lowest bits first:
    GGML stores field j of byte i as element j * n + i of the run the bytes cover."""
    shifts = np.arange(0, 8, width, dtype=np.uint8).reshape(-1, 1)
    return (b[..., None, :] >> shifts) & np.uint8((1 << width) - 1)


def _nibbles(qs: np.ndarray, run: int) -> np.ndarray:
    """Low then high nibbles of each `run` bytes of qs [blocks, n] -> uint8 [blocks, 2 * n]."""
    nb = qs.shape[0]
    return _fields(qs.reshape(nb, -1, run), 4).reshape(nb, -1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """Single bits of qh [blocks, 32] bytes, bit j of byte i -> element j * 32 + i."""
    return _fields(qh, 1).reshape(qh.shape[0], -1)


def _q8_0(b: np.ndarray) -> Decoded:
    return b[:, 2:].view(np.int8).copy(), _f16(b, 0), None


def _q4_0(b: np.ndarray) -> Decoded:
    return _nibbles(b[:, 2:], 16).view(np.int8) - np.int8(8), _f16(b, 0), None


def _q4_1(b: np.ndarray) -> Decoded:
    return _nibbles(b[:, 4:], 16).view(np.int8), _f16(b, 0), _f16(b, 2)


def _five_bit(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    # Q5_0 / Q5_1: the 32 high bits are one little-endian uint32, bit j for element j
    hi = np.unpackbits(np.ascontiguousarray(qh), axis=-1, bitorder="little")
    return (_nibbles(qs, 16) | (hi << np.uint8(4))).view(np.int8)


def _q5_0(b: np.ndarray) -> Decoded:
    return _five_bit(b[:, 2:6], b[:, 6:]) - np.int8(16), _f16(b, 0), None


def _q5_1(b: np.ndarray) -> Decoded:
    return _five_bit(b[:, 4:8], b[:, 8:]), _f16(b, 0), _f16(b, 2)


def _k_scale_min(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: 8 six-bit scales and 8 six-bit mins packed in 12 bytes -> fp32 [blocks, 8].
    Bytes 0-3 / 4-7 hold scales / mins 0-3 in their low 6 bits and the top 2 bits of scales /
    mins 4-7; bytes 8-11 hold the low 4 bits of scales 4-7 (low nibble) and mins 4-7 (high)."""
    lo_s, lo_m, mix = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([lo_s & 63, (mix & 15) | ((lo_s >> 6) << 4)], axis=1)
    mn = np.concatenate([lo_m & 63, (mix >> 4) | ((lo_m >> 6) << 4)], axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _q4_k(b: np.ndarray) -> Decoded:
    sc, mn = _k_scale_min(b[:, 4:16])
    q = _nibbles(b[:, 16:144], 32).view(np.int8)
    return q, _f16(b, 0) * sc, -(_f16(b, 2) * mn)


def _q5_k(b: np.ndarray) -> Decoded:
    sc, mn = _k_scale_min(b[:, 4:16])
    q = (_nibbles(b[:, 48:176], 32) | (_high_bits(b[:, 16:48]) << np.uint8(4))).view(np.int8)
    return q, _f16(b, 0) * sc, -(_f16(b, 2) * mn)


def _two_bit(qs: np.ndarray) -> np.ndarray:
    """Q2_K / Q3_K low bits: each 32 bytes hold 4 runs of 32 two-bit values -> [blocks, 256]."""
    nb = qs.shape[0]
    return _fields(qs.reshape(nb, -1, 32), 2).reshape(nb, -1)


def _q2_k(b: np.ndarray) -> Decoded:
    s = b[:, 0:16]  # per 16-wide group: scale in the low nibble, min in the high one
    d, dmin = _f16(b, 80), _f16(b, 82)
    zero = -(dmin * (s >> 4).astype(np.float32))
    return _two_bit(b[:, 16:80]).view(np.int8), d * (s & 15).astype(np.float32), zero


def _q3_k(b: np.ndarray) -> Decoded:
    nb = b.shape[0]
    # the high bit is inverted: set means no -4 offset
    hi = _high_bits(b[:, 0:32]) ^ np.uint8(1)
    q = _two_bit(b[:, 32:96]).view(np.int8) - (hi << np.uint8(2)).view(np.int8)
    # 16 six-bit scales: low nibbles in bytes 96-103 (scales 0-7 low halves, 8-15 high
    # halves), 2-bit tops in bytes 104-107 (field j of byte i: scale 4 * j + i)
    low = _fields(b[:, 96:104], 4).reshape(nb, 16)
    top = _fields(b[:, 104:108], 2).reshape(nb, 16)
    sc = ((low | (top << np.uint8(4))).view(np.int8) - np.int8(32)).astype(np.float32)
    return q, _f16(b, 108) * sc, None


def _q6_k(b: np.ndarray) -> Decoded:
    nb = b.shape[0]
    ql = _nibbles(b[:, 0:128], 64)  # two halves of 128 values, each from 64 bytes
    qh = _fields(b[:, 128:192].reshape(nb, 2, 32), 2).reshape(nb, -1)
    q = (ql | (qh << np.uint8(4))).view(np.int8) - np.int8(32)
    return q, _f16(b, 208) * b[:, 192:208].view(np.int8).astype(np.float32), None


# type -> (decoder, group); the values' ranges are in the module doc
_SPLITS: dict[GGMLQuantizationType, tuple[Callable[[np.ndarray], Decoded], int]] = {
    T.Q8_0: (_q8_0, 32),
    T.Q4_0: (_q4_0, 32),
    T.Q4_1: (_q4_1, 32),
    T.Q5_0: (_q5_0, 32),
    T.Q5_1: (_q5_1, 32),
    T.Q2_K: (_q2_k, 16),
    T.Q3_K: (_q3_k, 16),
    T.Q4_K: (_q4_k, 32),
    T.Q5_K: (_q5_k, 32),
    T.Q6_K: (_q6_k, 16),
}
SPLIT_TYPES: frozenset[GGMLQuantizationType] = frozenset(_SPLITS)


def split_gguf(
    tensor_type: GGMLQuantizationType, data: np.ndarray, shape: tuple[int, int]
) -> GroupQuant | None:
    """None for a type without a split (the caller dequantizes it)."""
    if tensor_type not in _SPLITS:
        return None
    decode, group = _SPLITS[tensor_type]
    rows, cols = shape
    block, size = GGML_QUANT_SIZES[tensor_type]
    if cols % block:
        raise ValueError(f"{tensor_type.name}: {cols} columns is not a multiple of {block}")
    raw = np.ascontiguousarray(data).view(np.uint8)
    if raw.size != rows * (cols // block) * size:
        raise ValueError(f"{tensor_type.name}: {raw.shape} bytes do not hold a {shape} tensor")
    q, scale, zero = decode(raw.reshape(-1, size))

    def rows_of(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a).reshape(rows, -1))

    zero_t = None if zero is None else rows_of(zero)
    return GroupQuant(q=rows_of(q), scale=rows_of(scale), zero=zero_t, group=group)
