"""Load an HF-format checkpoint (config.json + safetensors) into a rank's sharded model.

The checkpoint is opened lazily (LazyTensor views over safetensors `get_slice`); renaming and
fusing (gate/up, per-expert stacking) build lazy cat / stack views, and each parameter's weight
loader narrows them to its shard, so a rank reads only its own slices of the checkpoint.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import safe_open

from dpattn.layers.quant import dense
from dpattn.layers.weights import LazyTensor, ReadContext, load_param
from dpattn.models.fp8 import checkpoint_fp8_block, dequantize_fp8
from dpattn.models.llama import DecoderModel
from dpattn.models.quantized import GGUF_SIDECAR, attach_gguf

T = TypeVar("T", torch.Tensor, LazyTensor)

_PER_EXPERT = re.compile(
    r"(layers\.\d+\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$"
)
_EXPERT_KIND = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_RENAMES = [
    (re.compile(r"self_attn\.([qkvo])_proj\.weight$"), r"self_attn.\1_proj"),
    (re.compile(r"self_attn\.([qkv])_proj\.bias$"), r"self_attn.\1_bias"),
    (re.compile(r"mlp\.experts\.gate_up_proj(\.weight)?$"), "mlp.w13"),
    (re.compile(r"mlp\.experts\.down_proj(\.weight)?$"), "mlp.w2"),
    (re.compile(r"mlp\.gate\.weight$"), "mlp.gate"),
    (re.compile(r"mlp\.gate\.e_score_correction_bias$"), "mlp.e_score_correction_bias"),
    (re.compile(r"(mlp(?:\.shared_experts)?)\.down_proj\.weight$"), r"\1.down_proj"),
    # MLA (DeepSeek): projections are plain parameters named after the module
    (re.compile(r"self_attn\.(\w+_proj(?:_with_mqa)?)\.weight$"), r"self_attn.\1"),
]


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class SafetensorsSource:
    """One key of a safetensors file, read in parts with `get_slice`.

    A read opens the file once per ReadContext (one parameter's load): its mapping, and the
    pages a read touched, go away with the parameter's last slice instead of piling up.
    """

    def __init__(self, file: Path, key: str, shape: list[int], dtype: str) -> None:
        self.file, self.key, self.shape = file, key, tuple(shape)
        # Only used for empty reads and cat / stack promotion; reads keep the stored dtype.
        self.dtype = _DTYPES.get(dtype, torch.float32)

    def read(self, index: tuple[slice, ...], ctx: ReadContext) -> torch.Tensor:
        handle = ctx.get(self.file)
        if handle is None:
            handle = ctx[self.file] = safe_open(str(self.file), framework="pt")
        return handle.get_slice(self.key)[index if index else ...]

    def __repr__(self) -> str:
        return f"SafetensorsSource({self.file.name}:{self.key})"


def open_checkpoint(path: str | Path, sidecar: bool = False) -> dict[str, LazyTensor]:
    """Every tensor of the checkpoint's *.safetensors files, lazily: nothing is read yet. A
    GGUF model's integer sidecar is apart: `sidecar` opens it alone."""
    if sidecar:
        files = [Path(path) / GGUF_SIDECAR]
    else:
        files = sorted(f for f in Path(path).glob("*.safetensors") if f.name != GGUF_SIDECAR)
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    tensors: dict[str, LazyTensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                sl = fh.get_slice(key)
                source = SafetensorsSource(f, key, sl.get_shape(), sl.get_dtype())
                tensors[key] = LazyTensor.from_source(source)
    return tensors


def checkpoint_to_params(model: DecoderModel, tensors: dict[str, T]) -> dict[str, T]:
    """Full (unsharded) tensors under our parameter names; fuses gate/up and per-expert keys.

    Works on real tensors and on LazyTensors (the fused ones then stay lazy cat / stack views).
    """
    out: dict[str, T] = {}
    experts: dict[tuple[str, str], dict[int, T]] = defaultdict(dict)
    dense: dict[tuple[str, str], T] = {}
    for key, t in tensors.items():
        name = model.checkpoint_name(key)
        if name is None:
            continue
        m = _PER_EXPERT.search(name)
        if m:
            experts[(m[1], _EXPERT_KIND.get(m[3], m[3]))][int(m[2])] = t
            continue
        m2 = re.search(
            r"(layers\.\d+\.mlp(?:\.shared_experts)?)\.(gate_proj|up_proj)\.weight$", name
        )
        if m2:
            dense[(m2[1], m2[2])] = t
            continue
        for pattern, repl in _RENAMES:
            name = pattern.sub(repl, name)
        out[name] = t
    for (prefix, kind), t in dense.items():
        if kind == "gate_proj":
            out[f"{prefix}.gate_up_proj"] = torch.cat([t, dense[(prefix, "up_proj")]])
    prefixes = {p for p, _ in experts}
    for prefix in prefixes:
        n = len(experts[(prefix, "gate_proj")])
        gate, up, down = (experts[(prefix, k)] for k in ("gate_proj", "up_proj", "down_proj"))
        out[f"{prefix}.w13"] = torch.stack([torch.cat([gate[e], up[e]]) for e in range(n)])
        out[f"{prefix}.w2"] = torch.stack([down[e] for e in range(n)])
    return out


def load_weights(model: DecoderModel, path: str | Path, quantization: str = "none") -> None:
    """Load this rank's shards: each parameter reads only its own slices of the checkpoint.

    fp8: block-wise weights are dequantized as they are read. gguf: the parameters the GGUF
    sidecar holds get their integer shards (`group_quant`) and are not read dense at all (their
    memory stays untouched until something asks for the dense form: quant.dense)."""
    tensors = open_checkpoint(path)
    if quantization == "fp8":
        block = checkpoint_fp8_block(path)
        assert block is not None
        tensors = dequantize_fp8(tensors, block)
    full = checkpoint_to_params(model, tensors)
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(full))
    if missing:
        raise ValueError(f"checkpoint {path} lacks weights for: {', '.join(missing[:8])}")
    derived = any(hasattr(m, "post_load") for m in model.modules())
    taken = attach_gguf(model, Path(path)) if quantization == "gguf" else set()
    for name, p in params.items():
        if name in taken:
            if derived:  # post_load reads dense weights
                dense(p)
            continue
        load_param(p, full[name])  # converts to p.dtype after reading
    for module in model.modules():
        if hasattr(module, "post_load"):
            module.post_load()  # weights derived from loaded ones (MLA's absorbed kv_b_proj)
