"""The one matmul every projection goes through: y = x @ weight.T (+ bias).

On CPU in fp32 with few rows (decode batches) it computes weight @ x.T instead: BLAS then streams the
large weight matrix as it is stored rather than packing it per call, 1.3-2x faster for the
projections and the LM head at 4-64 rows (measured on 2 cores). The dot products are the same;
only the kernel differs. Very tall weights (the LM head) go in row blocks that stay in cache.

Faster still, on CPU the model runner prepacks every projection once after loading (prepack()):
oneDNN's blocked weight layout, fp32, 1.2-1.9x the plain kernels at 1-64 rows (measured on 2
cores; `dpattn bench --compare-transformers`). A bf16 / fp16 model's weights are packed as fp32
copies (exact) and its activations upcast per call: the products and the fp32 accumulation are
those of a native bf16 kernel, which CPUs without bf16 FMA (AVX2) run 5-10x slower. Except for
one row, where the plain bf16 weight kept beside the copy wins: the step reads half the bytes
(Gemma 3 270M's 18 layers at one row: 13-19 ms against 25-33 ms packed; equal at 2 rows; the
packed copy wins from 4, measured on 2 cores).

A quantized projection (layers/quant.py) is an Int4Weight, which linear() calls; pack_weight is
where each projection's format is chosen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpattn.layers.quant import (
    KERNEL_GROUPS,
    GroupQuant,
    Int4Weight,
    WeightFormat,
    current_format,
    dense,
    effective,
    group_quant,
    note_dense,
    weight_format,
)

SKINNY_ROWS = 128  # above this F.linear's packed GEMM is as fast or faster (measured)
_BLOCK_ROWS = 4096  # weight rows per block for tall weights (vocab-sized)
_TALL = 8 * _BLOCK_ROWS


def linear(
    x: torch.Tensor, weight: torch.Tensor | Int4Weight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    if isinstance(weight, Int4Weight):
        if weight.batch_weight is None or x.numel() <= weight.max_rows * x.shape[-1]:
            return weight(x, bias)
        weight = weight.batch_weight
    if weight.is_mkldnn:  # prepacked
        plain = getattr(weight, "plain", None)
        if plain is not None and x.dim() == 2 and x.shape[0] == 1:
            return F.linear(x, plain, bias)
        rows = x.float()
        m = rows.shape[0]
        padded = packed_rows(m) if rows.dim() == 2 else m
        if padded != m:  # rows are independent: the extra zero rows change no real row
            rows = F.pad(rows, (0, 0, 0, padded - m))
        out = torch.ops.mkldnn._linear_pointwise(rows, weight, None, "none", [], "")[:m]
        out = out.to(x.dtype)
        return out if bias is None else out + bias
    if (
        x.device.type != "cpu"
        or x.dtype != torch.float32  # bf16 on CPUs without bf16 FMA: no gain, measured
        or x.dim() != 2
        or not 1 < x.shape[0] <= SKINNY_ROWS
    ):
        return F.linear(x, weight, bias)
    n = weight.shape[0]
    if n < _TALL:
        out = torch.mm(weight, x.t()).t().contiguous()
    else:  # transpose block by block while the block is in cache
        out = x.new_empty((x.shape[0], n))
        block = x.new_empty((_BLOCK_ROWS, x.shape[0]))
        for lo in range(0, n, _BLOCK_ROWS):
            rows = min(_BLOCK_ROWS, n - lo)
            torch.mm(weight[lo : lo + rows], x.t(), out=block[:rows])
            out[:, lo : lo + rows].copy_(block[:rows].t())
    return out if bias is None else out + bias


def packed_rows(m: int) -> int:
    """The row count a prepacked GEMM runs with: m up to 16, then 8 sizes per doubling (at most
    12.5% padding), 88 sizes up to 8192. oneDNN compiles kernels per (weight, rows) shape, about
    0.6 MB and 1 ms each (measured): with every row count its own, a rank compiled and cached
    kernels for every new batch and chunk size (the soak's rank RSS rose 14% over 5,000
    requests; host_memory bounds the caches). Decode batches of 1-16 and 64, 256-token chunks
    run unpadded."""
    if m <= 16:
        return m
    step = 1 << ((m - 1).bit_length() - 4)
    return -(-m // step) * step


def can_prepack(device: torch.device) -> bool:
    return device.type == "cpu" and torch.backends.mkldnn.is_available()


def pack_weight(*weights: torch.Tensor, quantize: bool = True) -> torch.Tensor | Int4Weight:
    """These projection weights [out, in], stacked by rows, in the format linear() runs them
    with under the current WeightFormat (layers/quant.py): an Int4Weight, or dense, oneDNN-
    packed on CPU (fp32; a bf16 / fp16 weight stays beside it as `plain`, for one-row calls,
    see the module's doc). `quantize=False`: a weight that stays in the model dtype (a router,
    MLA's kv_b_proj, which the absorbed path also reads as a plain tensor)."""
    fmt = current_format()
    gq = group_quant(weights, fmt) if quantize else None
    if gq is not None and fmt.int4_kernel and gq.group in KERNEL_GROUPS:
        dense_batches = fmt.batch_path == "dense" and fmt.dense_prepack
        return Int4Weight(gq, _reorder if dense_batches else None)
    weights = tuple(dense(w) for w in weights)
    weight = weights[0] if len(weights) == 1 else torch.cat(weights)
    if gq is not None:
        if fmt.method != "gguf":  # quantized at load: the values the format would compute with
            weight = effective(gq).dequantize().to(weight.device, weight.dtype)
        note_dense(
            f"{fmt.method}: no int4 kernel for group {gq.group} on {weight.device.type}: "
            "those weights stay dense"
        )
    elif quantize and fmt.method == "gguf":
        note_dense("gguf: tensors stored in float or in a type without a split stay dense")
    if not fmt.dense_prepack:
        return weight.detach()
    packed = _reorder(weight.detach())
    if weight.dtype in (torch.bfloat16, torch.float16):
        packed.plain = weight.detach()  # type: ignore[attr-defined]
    return packed


def _reorder(weight: torch.Tensor) -> torch.Tensor:
    """`weight` fp32, in oneDNN's blocked layout (what linear()'s prepacked path runs)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.float().contiguous())


def pack_params(module: nn.Module, *names: str, quantize: bool = True) -> None:
    """Replace these parameters of `module` by their packed form (the plain copy is freed)."""
    for name in names:
        weight = module._parameters.pop(name)
        assert weight is not None
        setattr(module, name, pack_weight(weight, quantize=quantize))


def pack_experts(module: nn.Module, *names: str) -> None:
    """Per-expert weights [E, out, in]: a list of packed experts when the format quantizes them
    at load, else left as they are (the MoE layer runs grouped GEMMs over the 3-d weight; the
    GGUF sidecar holds 2-d tensors only)."""
    if current_format().method not in ("int8", "int4"):
        return
    for name in names:
        weight = module._parameters.pop(name)
        assert weight is not None
        setattr(module, name, [pack_weight(w) for w in weight.unbind(0)])


def lookup_table(weight: torch.Tensor) -> torch.Tensor | GroupQuant:
    """An embedding's rows for lookups: a GGUF model's integer rows where it has them (a
    quarter of fp32's bytes; lookups dequantize only the rows they take), else the weight."""
    gq = getattr(weight, "group_quant", None)
    return gq if gq is not None and current_format().method == "gguf" else weight


def embedding(ids: torch.Tensor, table: torch.Tensor | GroupQuant) -> torch.Tensor:
    if isinstance(table, GroupQuant):
        return table.take(ids)
    return F.embedding(ids, table)


def prepack(model: nn.Module, fmt: WeightFormat) -> None:
    """Put every projection into `fmt` (`prepack()` of each layer that offers it), once, after
    loading; an error names the layer."""
    with weight_format(fmt):
        for name, module in model.named_modules():
            if hasattr(module, "prepack"):
                try:
                    module.prepack()
                except ValueError as e:
                    raise ValueError(f"{name or 'model'}: {e}") from None
