"""Quantized checkpoints: which format a model directory is in, and reading its integer weights.

A GGUF model converted by dpattn (models/gguf_convert.py) is an HF directory in fp32 (exactly
the GGUF's dequantized values: transformers reads it, `--quantization none` serves it) plus a
sidecar, `gguf-quants.safetensors`, holding each quantized tensor's integer values, scales and
offsets under its HF name (`KEY:q`, `KEY:scale`, `KEY:zero`). `--quantization gguf` reads the
sidecar's shards instead of the fp32 ones: the weight loaders that cut a parameter's shard out
of the full tensor cut the scales too, through a view that maps input columns onto groups.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from dpattn.layers.quant import KERNEL_GROUPS, QUANTIZATIONS, GroupQuant, effective, quantize
from dpattn.layers.weights import LazyTensor, ReadContext

GGUF_SIDECAR = "gguf-quants.safetensors"


class QuantizationError(ValueError):
    """A --quantization that does not fit the checkpoint (a user error: exit 2)."""


def checkpoint_quantization(path: str | Path) -> str:
    """The format the checkpoint's weights are stored in: gguf, fp8 or none."""
    path = Path(path)
    if (path / GGUF_SIDECAR).is_file():
        return "gguf"
    config = json.loads((path / "config.json").read_text())
    quant = config.get("quantization_config") or config.get("text_config", {}).get(
        "quantization_config"
    )
    if quant:
        method = quant.get("quant_method") if isinstance(quant, dict) else quant
        if method != "fp8":
            raise QuantizationError(
                f"unsupported checkpoint: quantization_config (quant_method={method!r}); "
                "dpattn reads fp8 block-wise checkpoints and GGUF files"
            )
        return "fp8"
    return "none"


def resolve_quantization(path: str | Path, requested: str | None) -> str:
    """The method a model runs with: `requested`, or the checkpoint's own (None)."""
    stored = checkpoint_quantization(path)
    if requested is None:
        return stored
    if requested not in QUANTIZATIONS:
        raise QuantizationError(f"--quantization {requested!r}: one of {', '.join(QUANTIZATIONS)}")
    if requested == "gguf" and stored != "gguf":
        raise QuantizationError(
            f"--quantization gguf: {path} is not a GGUF model (no {GGUF_SIDECAR})"
        )
    if requested == "fp8" and stored != "fp8":
        raise QuantizationError(f"--quantization fp8: {path} has no FP8 weights")
    if stored == "fp8" and requested != "fp8":
        # int8 / int4 of dequantized fp8 would quantize twice; none would read fp8 as plain
        raise QuantizationError(f"{path} is an FP8 checkpoint: run it with --quantization fp8")
    return requested


class _Grouped(LazyTensor):
    """Per-group values [..., K / g] seen as [..., K]: a weight loader narrows input columns,
    this narrows groups (whole groups only). Reads return the groups, [..., k / g]."""

    def __init__(self, inner: LazyTensor, group: int) -> None:
        self.inner, self.group = inner, group
        self.shape = torch.Size((*inner.shape[:-1], inner.shape[-1] * group))
        self.dtype = inner.dtype

    def _narrow(self, dim: int, start: int, length: int) -> LazyTensor:
        g = self.group
        if dim != self.ndim - 1:
            return _Grouped(self.inner.narrow(dim, start, length), g)
        if start % g or length % g:
            raise ValueError(f"an input shard [{start}, {start + length}) splits groups of {g}")
        return _Grouped(self.inner.narrow(dim, start // g, length // g), g)

    def new_zeros(self, size: Any, dtype: torch.dtype | None = None) -> LazyTensor:
        size = tuple(size)
        return _Grouped(
            self.inner.new_zeros((*size[:-1], size[-1] // self.group), dtype), self.group
        )

    def _read(self, ctx: ReadContext) -> torch.Tensor:
        return self.inner._read(ctx)


def _sidecar(path: Path) -> dict[str, dict[str, LazyTensor]]:
    """{part: {HF key: lazy tensor}} for part q, scale and zero (scales seen as [..., K])."""
    from dpattn.models.loader import open_checkpoint  # loader imports this module

    tensors = open_checkpoint(path, sidecar=True)
    parts: dict[str, dict[str, LazyTensor]] = {"q": {}, "scale": {}, "zero": {}}
    for name, t in tensors.items():
        key, part = name.rsplit(":", 1)
        parts[part][key] = t
    for key, scale in parts["scale"].items():
        # offsets for all (zeros where a type has none): fused parts (gate and up) may differ
        zero = parts["zero"].get(key, scale.new_zeros(scale.shape, torch.float32))
        group = parts["q"][key].shape[-1] // scale.shape[-1]
        parts["scale"][key], parts["zero"][key] = _Grouped(scale, group), _Grouped(zero, group)
    return parts


def attach_gguf(model: torch.nn.Module, path: Path) -> set[str]:
    """Give each parameter the GGUF sidecar holds its shard of (`p.group_quant`); the names of
    those parameters (the dense loader then leaves them unread)."""
    from dpattn.models.loader import checkpoint_to_params

    parts = {k: checkpoint_to_params(model, v) for k, v in _sidecar(path).items()}  # type: ignore[arg-type]
    taken = set()
    for name, p in model.named_parameters():
        if name not in parts["q"]:
            continue
        load = p.weight_loader  # type: ignore[attr-defined]
        try:
            q = load(parts["q"][name]).materialize()
            scale = load(parts["scale"][name]).materialize().float()
            zero = load(parts["zero"][name]).materialize().float()
        except (RuntimeError, ValueError):
            continue  # fused parts with different groups, or a shard inside a group: dense
        p.group_quant = GroupQuant(  # type: ignore[attr-defined]
            q.to(p.device),
            scale.to(p.device),
            zero.to(p.device) if zero.any() else None,
            q.shape[-1] // scale.shape[-1],
        )
        taken.add(name)
    return taken


# ---- the reference of `dpattn verify`: transformers with the weights the kernels compute with


def _projections(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """The HF model's projection weights dpattn quantizes: every Linear but MoE routers and MLA's
    kv_b_proj (layers/moe.py, layers/mla.py keep them dense), and the 3-d expert weights."""
    for name, module in model.named_modules():
        if name.endswith(("mlp.gate", "kv_b_proj")):
            continue
        if isinstance(module, torch.nn.Linear):
            yield f"{name}.weight", module.weight
        elif name.endswith("experts"):
            for pname in ("gate_up_proj", "down_proj"):
                p = getattr(module, pname, None)
                if isinstance(p, torch.nn.Parameter) and p.dim() == 3:
                    yield f"{name}.{pname}", p


def reference_weights(
    model: torch.nn.Module, path: str | Path, method: str, group_size: int
) -> None:
    """Replace, in transformers' `model`, each weight dpattn runs quantized by the dense weight
    its kernel computes with (int4 kernel groups; GGUF types without one stay as read). A
    fused weight whose GGUF parts have different groups (q and v, gate and up) runs dense in
    dpattn: there this reference is off by its scales' bf16 rounding (none in the default
    model: its fused parts share groups of 32)."""
    if method in ("none", "fp8"):  # fp8 is dequantized at load: the checkpoint as read
        return
    gguf: dict[str, GroupQuant] = {}
    if method == "gguf":
        parts = _sidecar(Path(path))
        for key, q in parts["q"].items():
            scale, zero = parts["scale"][key], parts["zero"][key].materialize().float()
            gguf[key] = GroupQuant(
                q.materialize(),
                scale.materialize().float(),
                zero if zero.any() else None,
                scale.group,  # type: ignore[attr-defined]
            )
    tied = getattr(model.config, "tie_word_embeddings", False)
    embed_key = next((k for k in gguf if k.endswith("embed_tokens.weight")), None)
    with torch.no_grad():
        for name, p in _projections(model):
            key = embed_key if name == "lm_head.weight" and tied and embed_key else name
            if method == "gguf":
                gq = gguf.get(key)
                if gq is None or gq.group not in KERNEL_GROUPS:
                    continue
                w = effective(gq).dequantize()
            else:
                w = effective(quantize(p, 8 if method == "int8" else 4, group_size)).dequantize()
            if name == "lm_head.weight" and tied:  # the lookup keeps the exact rows: untie
                model.lm_head.weight = torch.nn.Parameter(w.to(p.dtype), requires_grad=False)
                model.config.tie_word_embeddings = False
            else:
                p.copy_(w.view_as(p))
