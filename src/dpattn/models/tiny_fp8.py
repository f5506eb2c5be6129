"""Tiny FP8 block-wise checkpoints (DeepSeek-V3 layout) made from any HF checkpoint, and the plain
checkpoint they dequantize to (a reference that transformers loads as is).

    python -m dpattn.models.tiny_fp8 SRC OUT [--block N [M]] [--reference DIR]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from dpattn.models.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    SCALE_SUFFIX,
    checkpoint_fp8_block,
    dequantize_fp8,
    fp8_block_size,
)
from dpattn.models.loader import open_checkpoint

_LAYER = re.compile(r"^model\.layers\.\d+\.")
# Kept in full precision, as in DeepSeek-V3's checkpoints: norms, the MoE router (mlp.gate, and
# its e_score_correction_bias), and the MTP layers' copies of the embedding and LM head. Outside
# the decoder layers (embed_tokens, model.norm, lm_head) nothing is quantized.
_KEEP = re.compile(r"norm|\.gate\.weight$|embed_tokens|shared_head\.head")


def is_quantized_key(key: str, t: torch.Tensor) -> bool:
    """Whether the FP8 checkpoint stores `key` in fp8: the decoder layers' linear projections."""
    return bool(
        _LAYER.match(key) and t.ndim >= 2 and t.is_floating_point() and not _KEEP.search(key)
    )


def quantize_block(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, float32 scale_inv) with scale_inv = block amax / 448, as DeepSeek's quantizer
    (an all-zero block gets scale 1). Blocks over the last two dims; edge blocks may be partial."""
    (rows, cols), (b0, b1) = w.shape[-2:], block
    nr, nc = -(-rows // b0), -(-cols // b1)
    padded = F.pad(w.float().abs(), (0, nc * b1 - cols, 0, nr * b0 - rows))
    amax = padded.unflatten(-1, (nc, b1)).unflatten(-3, (nr, b0)).amax(dim=(-3, -1))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    full = scale.repeat_interleave(b0, -2)[..., :rows, :].repeat_interleave(b1, -1)[..., :cols]
    q = (w.float() / full).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale.contiguous()


def _rewrite(
    src: Path,
    out: Path,
    convert: Callable[[Path], dict[str, torch.Tensor]],
    edit_config: Callable[[dict], None],
) -> None:
    """Copy checkpoint `src` to `out`: shards through `convert`, config.json through
    `edit_config`, the index's weight map recomputed, every other file copied."""
    out.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    for f in sorted(src.iterdir()):
        if f.suffix == ".safetensors":
            tensors = convert(f)
            save_file(tensors, str(out / f.name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, f.name))
        elif f.is_file():
            shutil.copy2(f, out / f.name)
    cfg = json.loads((out / "config.json").read_text())
    edit_config(cfg)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    index = out / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = dict(sorted(weight_map.items()))
        index.write_text(json.dumps(data, indent=2) + "\n")


def make_fp8_checkpoint(
    src: str | Path, out: str | Path, block: tuple[int, int] = (128, 128)
) -> Path:
    """Write an FP8 block-wise copy of checkpoint `src` (e.g. from `dpattn make-tiny-model`) to
    `out`: projection weights in float8_e4m3fn plus ``*_scale_inv``, config.json with the
    DeepSeek-V3 quantization_config (weight_block_size=`block`), tokenizer files copied."""
    src, out = Path(src), Path(out)
    quant = dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic")
    quant["weight_block_size"] = list(block)
    block = fp8_block_size(quant)  # type: ignore[assignment]
    if checkpoint_fp8_block(src) is not None:
        raise ValueError(f"{src} is already quantized")

    def convert(f: Path) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                t = fh.get_tensor(key)
                if is_quantized_key(key, t):
                    tensors[key], tensors[key + SCALE_SUFFIX] = quantize_block(t, block)
                else:
                    tensors[key] = t
        return tensors

    _rewrite(src, out, convert, lambda cfg: cfg.update(quantization_config=quant))
    return out


def write_dequantized(
    fp8_dir: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None
) -> Path:
    """Write the plain checkpoint that FP8 checkpoint `fp8_dir` dequantizes to (no scale_inv,
    no quantization_config). Dequantized weights are cast to `dtype` (default: config.json's
    dtype, else bfloat16); the other tensors keep their stored dtype. One shard in memory at a
    time."""
    fp8_dir, out_dir = Path(fp8_dir), Path(out_dir)
    cfg = json.loads((fp8_dir / "config.json").read_text())
    block = fp8_block_size(cfg.get("quantization_config"))
    if block is None:
        raise ValueError(f"{fp8_dir} has no quantization_config")
    if dtype is None:
        dtype = getattr(torch, cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16")
    tensors = dequantize_fp8(open_checkpoint(fp8_dir), block, dtype)

    def convert(f: Path) -> dict[str, torch.Tensor]:
        with safe_open(str(f), framework="pt") as fh:
            keys = [k for k in fh.keys() if not k.endswith(SCALE_SUFFIX)]  # noqa: SIM118
        return {k: tensors[k].materialize().contiguous() for k in keys}

    _rewrite(fp8_dir, out_dir, convert, lambda c: c.pop("quantization_config"))
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dpattn.models.tiny_fp8", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("src", type=Path, help="a plain HF checkpoint directory")
    parser.add_argument("out", type=Path, help="where to write the FP8 copy")
    parser.add_argument(
        "--block", type=int, nargs="+", default=[128], metavar="N", help="block N [M] (default 128)"
    )
    parser.add_argument("--reference", type=Path, help="also write its dequantized copy here")
    args = parser.parse_args(argv)
    if len(args.block) > 2:
        parser.error("--block takes N or N M")
    block = (args.block[0], args.block[-1])
    try:
        make_fp8_checkpoint(args.src, args.out, block)
        if args.reference:
            write_dequantized(args.out, args.reference)
    except ValueError as e:
        parser.error(str(e))
    print(args.out)


if __name__ == "__main__":
    main()
