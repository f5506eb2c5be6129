"""FP8 block-wise checkpoints (DeepSeek-V3 style), read as lazily dequantized tensors.

Each quantized ``X.weight`` [..., out, in] (float8_e4m3fn) has a float32 companion
``X.weight_scale_inv`` [..., ceil(out / b0), ceil(in / b1)]; the real weight is
``weight.float() * scale_inv[i // b0, j // b1]`` (edge blocks may be partial). Fused expert
tensors (``X`` without ``.weight``, scale ``X_scale_inv``) follow the same rule on their last two
dims. `dequantize_fp8` wraps each such pair in a `Fp8BlockTensor`: a narrow (any offset) reads
only the fp8 rows / columns it selects and the scale blocks that cover them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dpattn.layers.weights import LazyTensor, ReadContext

SCALE_SUFFIX = "_scale_inv"
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
_FLOAT8 = tuple(
    getattr(torch, n)
    for n in (
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
    )
    if hasattr(torch, n)
)
# Fields whose values we check (value: the ones we can serve; None: field may be absent).
_ACCEPTED: dict[str, tuple[Any, ...]] = {
    "fmt": ("e4m3",),
    "activation_scheme": ("dynamic",),
    "scale_fmt": ("float",),
    "expert_dtype": ("fp8",),
    "modules_to_convert": (None, []),  # fp8 embeddings (per-tensor weight_scale)
}
# Fields that change nothing about reading the weights (we find them by their scale_inv).
_INFORMATIONAL = {"quant_method", "weight_block_size", "dequantize"}
_INFORMATIONAL |= {"modules_to_not_convert", "ignored_layers"}


def fp8_block_size(quant_config: Any) -> tuple[int, int] | None:
    """The (rows, cols) weight block of an FP8 block-wise `quantization_config` (None: none).

    Raises ValueError naming the field for anything else (another quant_method, a static
    activation scheme, ue8m0 scales, a missing or malformed weight_block_size, unknown fields).
    """
    if not quant_config:
        return None
    if not isinstance(quant_config, dict):
        quant_config = quant_config.to_dict()  # a transformers QuantizationConfigMixin
    method = quant_config.get("quant_method")
    if method != "fp8":
        raise ValueError(
            f"unsupported quantization_config: quant_method={method!r} (only 'fp8' block-wise)"
        )
    unknown = sorted(set(quant_config) - set(_ACCEPTED) - _INFORMATIONAL)
    if unknown:
        raise ValueError(f"unsupported quantization_config field(s): {', '.join(unknown)}")
    for field, ok in _ACCEPTED.items():
        value = quant_config.get(field, ok[0])
        value = value.lower() if isinstance(value, str) else value
        if value not in ok:
            raise ValueError(
                f"unsupported quantization_config: {field}={quant_config[field]!r} "
                f"(supported: {ok[0]!r})"
            )
    block = quant_config.get("weight_block_size")
    if (
        not isinstance(block, (list, tuple))
        or len(block) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise ValueError(
            f"unsupported quantization_config: weight_block_size={block!r} "
            "(need two positive ints; per-tensor FP8 is not supported)"
        )
    return int(block[0]), int(block[1])


def checkpoint_fp8_block(path: str | Path) -> tuple[int, int] | None:
    """`fp8_block_size` of the checkpoint directory's config.json (None: not quantized)."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    return fp8_block_size(cfg.get("quantization_config"))


def _blocks(n: int, b: int) -> int:
    return -(-n // b)


def dequantize_block(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]
) -> torch.Tensor:
    """Eager reference: the whole fp8 `weight` times its per-block `scale_inv`, in float32."""
    rows, cols = weight.shape[-2:]
    s = scale_inv.float().repeat_interleave(block[0], -2)[..., :rows, :]
    return weight.float() * s.repeat_interleave(block[1], -1)[..., :cols]


class Fp8BlockTensor(LazyTensor):
    """An fp8 weight view times its block scales, computed per read in float32.

    `weight`: the (narrowed) fp8 LazyTensor; `scale`: the scale grid, narrowed on the leading
    dims only; `offset`: where `weight`'s last two dims start in the full weight.
    """

    def __init__(
        self,
        weight: LazyTensor,
        scale: LazyTensor,
        block: tuple[int, int],
        offset: tuple[int, int],
        dtype: torch.dtype,
    ) -> None:
        self.weight, self.scale, self.block, self.offset = weight, scale, block, offset
        self.shape, self.dtype = weight.shape, dtype

    def _narrow(self, dim: int, start: int, length: int) -> LazyTensor:
        lead = self.ndim - 2
        weight = self.weight.narrow(dim, start, length)
        if dim < lead:
            scale = self.scale.narrow(dim, start, length)
            return Fp8BlockTensor(weight, scale, self.block, self.offset, self.dtype)
        offset = list(self.offset)
        offset[dim - lead] += start
        return Fp8BlockTensor(weight, self.scale, self.block, (offset[0], offset[1]), self.dtype)

    def _read(self, ctx: ReadContext) -> torch.Tensor:
        if self.numel() == 0:
            return torch.empty(self.shape, dtype=self.dtype)
        (r0, c0), (n, m), (b0, b1) = self.offset, self.shape[-2:], self.block
        i0, j0 = r0 // b0, c0 // b1
        i1, j1 = _blocks(r0 + n, b0), _blocks(c0 + m, b1)
        scale = self.scale.narrow(-2, i0, i1 - i0).narrow(-1, j0, j1 - j0)._read(ctx).float()
        scale = scale.index_select(-1, torch.arange(c0, c0 + m) // b1 - j0)  # [..., i1 - i0, m]
        out = self.weight._read(ctx).to(torch.float32)
        for i in range(i0, i1):  # one block row at a time: no weight-sized scale tensor
            lo, hi = max(r0, i * b0) - r0, min(r0 + n, (i + 1) * b0) - r0
            out[..., lo:hi, :].mul_(scale[..., i - i0, None, :])
        return out.to(self.dtype)

    @staticmethod
    def of(
        key: str,
        weight: LazyTensor,
        scale: LazyTensor,
        block: tuple[int, int],
        dtype: torch.dtype = torch.float32,
    ) -> Fp8BlockTensor:
        """Check `weight` / `scale` (the checkpoint's `key` and `key + "_scale_inv"`) and pair them."""
        if weight.dtype != FP8_DTYPE or weight.ndim < 2:
            raise ValueError(
                f"{key}: has {key}{SCALE_SUFFIX} but is {weight.dtype} {tuple(weight.shape)}, "
                f"expected a {FP8_DTYPE} matrix"
            )
        want = (*weight.shape[:-2], *(_blocks(n, b) for n, b in zip(weight.shape[-2:], block)))
        if (
            tuple(scale.shape) != want
            or not scale.dtype.is_floating_point
            or scale.dtype in _FLOAT8
        ):
            raise ValueError(
                f"{key}{SCALE_SUFFIX}: {scale.dtype} {tuple(scale.shape)} does not fit weight "
                f"{tuple(weight.shape)} in {block} blocks (expected a float tensor {want})"
            )
        return Fp8BlockTensor(weight, scale, block, (0, 0), dtype)


def dequantize_fp8(
    tensors: dict[str, LazyTensor], block: tuple[int, int], dtype: torch.dtype = torch.float32
) -> dict[str, LazyTensor]:
    """`tensors` with every fp8 ``X`` that has ``X_scale_inv`` replaced by its lazy dequantization
    (read as `dtype`), and the ``*_scale_inv`` keys removed; other tensors pass through.

    ValueError (naming the key) for an fp8 tensor without its scale_inv, a scale_inv without its
    weight, or a scale_inv whose shape is not the weight's block grid.
    """
    out: dict[str, LazyTensor] = {}
    for key, t in tensors.items():
        if key.endswith(SCALE_SUFFIX):
            if key.removesuffix(SCALE_SUFFIX) not in tensors:
                raise ValueError(f"{key}: no weight {key.removesuffix(SCALE_SUFFIX)!r} to scale")
            continue
        scale = tensors.get(key + SCALE_SUFFIX)
        if scale is not None:
            out[key] = Fp8BlockTensor.of(key, t, scale, block, dtype)
        elif t.dtype in _FLOAT8:
            raise ValueError(f"{key}: {t.dtype} tensor without {key}{SCALE_SUFFIX}")
        else:
            out[key] = t
    return out
