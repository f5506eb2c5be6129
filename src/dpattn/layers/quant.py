"""Weight formats of the projections: the one place a projection's weight format is chosen.

Model files declare plain parameters and call `linear()`; after loading, the model runner packs
them (`linear.prepack`) under a `WeightFormat`, and `linear.pack_weight` asks `group_quant()`
here what each projection becomes:

- `none`: the weight as loaded (the reference path; oneDNN-prepacked on CPU).
- `gguf`: a GGUF model's own integer weights (the loader attaches each shard's `GroupQuant`).
- `int8` / `int4`: quantized at load, per group of `group_size` inputs (int8 symmetric, int4
  with a minimum per group, as GGUF's Q4_K).

Every integer format runs on torch's group-wise int4 CPU kernel (`_weight_int4pack_mm_for_cpu`,
bf16 activations and scales): 4-bit values directly, wider ones (GGUF's 5- and 8-bit types,
int8) as two nibbles over a doubled input, w = 16 s h + s l + z, which keeps every value
exact; the 4 bytes per weight of fp32 become 0.5 or 1 (plus the int8 values the batch path
dequantizes: batches of more than 8 rows run fp32 GEMMs over dequantized row blocks, or, with
`batch_path` "dense", on an fp32 prepacked copy kept beside the packed weight). Scales
and offsets are rounded to bf16 (relative 2^-9, beside a 4-bit step of 1/15): `effective()`
is the weight the kernel computes with, which `dpattn verify` gives transformers as its
reference. Groups the kernel lacks (GGUF's Q6_K scales every 16 weights) and devices without
the kernel keep the dense weight, with one log line naming them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

QUANTIZATIONS = ("none", "gguf", "int8", "int4", "fp8")
KERNEL_GROUPS = (32, 64, 128, 256)  # what the CPU int4 kernel accepts
_N_ALIGN = 16  # its output rows come in tiles of 16
# The int4 kernel reads each weight once per row of the batch: past a few rows, dequantizing
# row blocks for the fp32 GEMM costs less (Gemma 3's LM head, 2 cores: 12 ms at 1 row, 72 ms
# at 16 and 283 ms at 64 on the kernel; 63 and 141 ms dequantized; measured).
INT4_MAX_ROWS = 8
_PACK_ROWS = 4096  # a multiple of the packer's row block (checked: same bytes as one call)
_DENSE_BLOCK = 4096  # weight rows per dequantized block (1024-4096 measured: 4096 fastest)


@dataclass(frozen=True)
class GroupQuant:
    """Integer weights with a scale and an offset per group of `group` consecutive inputs:
    w[..., k] = scale[..., k // group] * q[..., k] + zero[..., k // group], in fp32."""

    q: torch.Tensor  # int8 [..., K]
    scale: torch.Tensor  # fp32 [..., K / group]
    zero: torch.Tensor | None  # fp32 like scale; None: 0
    group: int

    def dequantize(self) -> torch.Tensor:
        w = self.q.float().unflatten(-1, (-1, self.group))
        w.mul_(self.scale[..., None])  # in place: one fp32 copy at a time (Gemma's head: 671 MB)
        if self.zero is not None:
            w.add_(self.zero[..., None])
        return w.flatten(-2)

    def take(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` dequantized (an embedding lookup), equal to dequantize()[ids]."""
        zero = None if self.zero is None else self.zero[ids]
        return GroupQuant(self.q[ids], self.scale[ids], zero, self.group).dequantize()

    @staticmethod
    def cat(parts: Sequence[GroupQuant]) -> GroupQuant | None:
        """Row-stacked parts (q, k and v into one), or None when their groups differ."""
        if len(parts) == 1:
            return parts[0]
        if len({p.group for p in parts}) > 1:
            return None
        zeros = [p.zero if p.zero is not None else torch.zeros_like(p.scale) for p in parts]
        has_zero = any(p.zero is not None for p in parts)
        return GroupQuant(
            torch.cat([p.q for p in parts]),
            torch.cat([p.scale for p in parts]),
            torch.cat(zeros) if has_zero else None,
            parts[0].group,
        )


def quantize(w: torch.Tensor, bits: int, group: int) -> GroupQuant:
    """Weight-only quantization of w [..., K]: int8 symmetric (q in [-127, 127]) or int4 with a
    minimum per group (q in [0, 15]). Scales are rounded to bf16 first (what the kernel uses)."""
    k = w.shape[-1]
    if k % group:
        raise ValueError(
            f"group size {group} does not divide the input width {k} (this rank's shard; "
            "--quant-group-size must divide every projection's)"
        )
    g = w.detach().float().unflatten(-1, (-1, group))
    if bits == 8:
        scale = _bf16((g.abs().amax(-1) / 127).clamp_min(1e-30))
        q = torch.round(g / scale[..., None]).clamp_(-127, 127)
        return GroupQuant(q.to(torch.int8).flatten(-2), scale, None, group)
    if bits != 4:
        raise ValueError(f"no {bits}-bit weight-only quantization (int8 or int4)")
    lo = g.amin(-1)
    scale = _bf16(((g.amax(-1) - lo) / 15).clamp_min(1e-30))
    zero = _bf16(lo)
    q = torch.round((g - zero[..., None]) / scale[..., None]).clamp_(0, 15)
    return GroupQuant(q.to(torch.int8).flatten(-2), scale, zero, group)


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


@dataclass(frozen=True)
class _KernelForm:
    """How the int4 kernel sees a GroupQuant: `split` maps its integer values to nibbles
    (0..15, int32), each with its bf16 scales and offsets: w = sum (u - 8) * s + z; and the
    same weight as one scale and offset, w = scale * q + zero (fp32)."""

    split: Callable[[torch.Tensor], list[torch.Tensor]]
    scales: list[torch.Tensor]
    zeros: list[torch.Tensor]
    effective: GroupQuant


def _kernel_form(gq: GroupQuant) -> _KernelForm:
    """No offset of the integer values is folded into z: a symmetric format keeps z = 8 s or 0,
    exact in bf16, so only the scale is rounded."""
    s = _bf16(gq.scale)  # 16 s stays exact in bf16
    z = gq.zero if gq.zero is not None else torch.zeros_like(s)
    lo, hi = int(gq.q.min()), int(gq.q.max())
    if 0 <= lo and hi <= 15:  # (q - 8) s + 8 s + z
        zk = _bf16(z + 8 * gq.scale)
        return _KernelForm(
            lambda q: [q.int()], [s], [zk], GroupQuant(gq.q, s, zk - 8 * s, gq.group)
        )
    if -8 <= lo and hi <= 7:  # u = q + 8: (u - 8) s + z
        zk = _bf16(z)
        return _KernelForm(lambda q: [q.int() + 8], [s], [zk], GroupQuant(gq.q, s, zk, gq.group))
    # q = 16 h + l, h in [-8, 7], l in [0, 15]: (h + 8 - 8) 16 s  +  (l - 8) s + 8 s + z
    zk = _bf16(z + 8 * gq.scale)
    return _KernelForm(
        lambda q: [(q.int() >> 4) + 8, q.int() & 15],
        [16 * s, s],
        [torch.zeros_like(s), zk],
        GroupQuant(gq.q, s, zk - 8 * s, gq.group),
    )


def effective(gq: GroupQuant) -> GroupQuant:
    """`gq` as the int4 kernel computes with it: the same values, the scale rounded to bf16 and
    the offset the kernel's bf16 offsets add up to (w = s q + z, fp32). Its dequantize() is the
    dense weight `dpattn verify` gives transformers as the reference, and what a batch uses."""
    return _kernel_form(gq).effective


class Int4Weight:
    """A projection weight [N, K] in the CPU int4 kernel's packed layout (see the module doc).
    `dense_packer` (WeightFormat.batch_path "dense"): packs the effective weight, dense, into
    `batch_weight`, which linear() runs batches of more than `max_rows` rows on."""

    def __init__(
        self,
        gq: GroupQuant,
        dense_packer: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        n, k = gq.q.shape
        self.shape = torch.Size((n, k))
        self.group = gq.group
        form = _kernel_form(gq)
        self.nibbles = len(form.scales)
        exact = form.effective
        self.batch_weight = None if dense_packer is None else dense_packer(exact.dequantize())
        # With the dense copy, the kernel keeps the rows it is faster at against oneDNN's fp32
        # GEMM (2 AVX2 cores, measured): 4-bit values up to 4 rows; two nibbles at one row
        # only, where the two are even (Gemma 3's LM head 28-30 ms against 23-35, noisy) and
        # the kernel reads a quarter of the bytes.
        self.max_rows = INT4_MAX_ROWS if dense_packer is None else 4 if self.nibbles == 1 else 1
        pad = -n % _N_ALIGN
        q = F.pad(gq.q, (0, 0, 0, pad))
        # Packed 4,096 rows at a time (the same bytes as one call): the int32 nibbles the
        # packer takes would be 8x the values' bytes at once (Gemma's head: 2.7 GB).
        self.packed = torch.cat(
            [
                torch._convert_weight_to_int4pack_for_cpu(torch.cat(form.split(rows), dim=1), 2)
                for rows in q.split(_PACK_ROWS)
            ]
        )
        sz = torch.stack([torch.cat(form.scales, 1), torch.cat(form.zeros, 1)], dim=-1)
        sz = F.pad(sz, (0, 0, 0, 0, 0, pad))
        self.scales_and_zeros = sz.transpose(0, 1).to(torch.bfloat16).contiguous()
        # Else the batch path: the values unpacked, each row block dequantized when a batch
        # runs. fp32, exact: bf16 weights cost Gemma 3 a KL of 0.01 against fp32 (measured)
        dequantize = dense_packer is None
        has_zero = dequantize and exact.zero is not None and bool(exact.zero.any())
        self.values = gq.q if dequantize else None
        self.scale = exact.scale if dequantize else None
        self.zero = exact.zero if has_zero else None

    @property
    def nbytes(self) -> int:
        parts = (self.packed, self.scales_and_zeros, self.values, self.scale, self.zero)
        dense = 0 if self.batch_weight is None else self.batch_weight.numel() * 4
        return sum(t.nbytes for t in parts if t is not None) + dense

    def _dense_mm(self, rows: torch.Tensor) -> torch.Tensor:
        """rows @ W.T through the dense GEMM, W dequantized one block of rows at a time (the
        block stays in cache between its dequantization and its GEMM). Each block computes
        W_block @ rows.T: BLAS streams the block as it lies instead of packing it per call
        (2x faster at 16-64 rows on 2 AVX2 cores, measured; see linear.py)."""
        n, k = self.shape
        g = self.group
        assert self.values is not None and self.scale is not None
        xs = rows.float()
        m = xs.shape[0]
        out = xs.new_empty((m, n))
        block = xs.new_empty((min(n, _DENSE_BLOCK), k // g, g))
        block_out = xs.new_empty((min(n, _DENSE_BLOCK), m))
        for lo in range(0, n, _DENSE_BLOCK):
            hi = min(n, lo + _DENSE_BLOCK)
            w = block[: hi - lo]
            w.copy_(self.values[lo:hi].view(hi - lo, -1, g))  # then scale in place: 2x faster
            w.mul_(self.scale[lo:hi, :, None])  # than one mixed-dtype mul (measured)
            if self.zero is not None:
                w += self.zero[lo:hi, :, None]
            torch.mm(w.view(hi - lo, k), xs.t(), out=block_out[: hi - lo])
            out[:, lo:hi].copy_(block_out[: hi - lo].t())
        return out

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        n = self.shape[0]
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] == 0:
            out = rows.new_zeros((0, n))
        elif rows.shape[0] > INT4_MAX_ROWS:
            out = self._dense_mm(rows).to(x.dtype)
        else:
            xs = rows.to(torch.bfloat16)
            if self.nibbles == 2:
                xs = torch.cat([xs, xs], dim=-1)
            out = torch._weight_int4pack_mm_for_cpu(
                xs, self.packed, self.group, self.scales_and_zeros
            )
            out = out[:, :n].to(x.dtype)
        out = out.reshape(*x.shape[:-1], n)
        return out if bias is None else out + bias


@dataclass(frozen=True)
class WeightFormat:
    """How `pack_weight` turns this rank's projections into what linear() runs."""

    method: str = "none"
    group_size: int = 128
    dense_prepack: bool = False  # oneDNN-prepack the weights that stay dense (CPU)
    int4_kernel: bool = False  # the device has the int4 kernel (CPU)
    # Batches past a few rows: "dequantize" row blocks every call (the quantized bytes only),
    # or "dense": keep the weight dense and prepacked beside its int4 form (fp32's bytes more;
    # oneDNN's fp32 GEMM is 1.4-2x faster at 16-64 rows on 2 AVX2 cores, measured)
    batch_path: str = "dequantize"


_DEFAULT = WeightFormat(dense_prepack=True)  # pack_weight called outside prepack (tests)
_state = threading.local()  # per thread: thread-backend ranks prepack at the same time
_logged: set[str] = set()


@contextmanager
def weight_format(fmt: WeightFormat) -> Iterator[None]:
    before = current_format()
    _state.fmt = fmt
    try:
        yield
    finally:
        _state.fmt = before


def current_format() -> WeightFormat:
    return getattr(_state, "fmt", _DEFAULT)


def group_quant(weights: Sequence[torch.Tensor], fmt: WeightFormat) -> GroupQuant | None:
    """The integer form of these row-stacked weights under `fmt`, or None (stays dense)."""
    if fmt.method == "gguf":
        parts = [getattr(w, "group_quant", None) for w in weights]
        if any(p is None for p in parts):
            return None  # a tensor the GGUF file stores in float (or a type without a split)
        return GroupQuant.cat(parts)  # type: ignore[arg-type]
    if fmt.method in ("int8", "int4"):
        w = torch.cat(list(weights)) if len(weights) > 1 else weights[0]
        return quantize(w, 8 if fmt.method == "int8" else 4, fmt.group_size)
    return None


def dense(w: torch.Tensor) -> torch.Tensor:
    """`w` with its dense values: a GGUF weight the loader left unread is filled from its
    integer form (exactly the values the fp32 checkpoint holds) the first time it is asked."""
    gq = getattr(w, "group_quant", None)
    if gq is not None and not getattr(w, "dense_filled", False):
        w.data.copy_(gq.dequantize().view_as(w))
        w.dense_filled = True  # type: ignore[attr-defined]
    return w


def note_dense(reason: str) -> None:
    """One log line per reason a quantized format keeps some weights dense."""
    if reason not in _logged:
        _logged.add(reason)
        log.warning("dpattn: %s", reason)


def weight_bytes(model: torch.nn.Module) -> int:
    """The bytes this rank's weights take in the format they run in: parameters and buffers,
    and the packed or quantized forms prepack put in their place (shared tensors once: a tied
    GGUF head and its lookup share their integer values)."""
    seen: set[int] = set()

    def size(v: object) -> int:
        if isinstance(v, torch.Tensor):
            key = id(v) if v.is_mkldnn else v.untyped_storage().data_ptr()
            if key in seen:
                return 0
            seen.add(key)
            return v.numel() * v.element_size()
        if isinstance(v, Int4Weight):
            return v.nbytes
        if isinstance(v, GroupQuant):
            return sum(size(t) for t in (v.q, v.scale, v.zero))
        if isinstance(v, list):
            return sum(size(x) for x in v)
        return 0

    total = 0
    for module in model.modules():
        total += sum(size(p) for p in module._parameters.values())
        total += sum(size(b) for b in module._buffers.values())
        total += sum(size(v) for k, v in vars(module).items() if not k.startswith("_"))
    return total
