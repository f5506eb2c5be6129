"""Load an HF-format checkpoint (config.json + safetensors) into a rank's sharded model."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open

from dpattn.layers.weights import load_param
from dpattn.models.llama import DecoderModel

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
    (re.compile(r"mlp\.down_proj\.weight$"), "mlp.down_proj"),
]


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensors[key] = fh.get_tensor(key)
    return tensors


def checkpoint_to_params(
    model: DecoderModel, tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Full (unsharded) tensors under our parameter names; fuses gate/up and per-expert keys."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = defaultdict(dict)
    dense: dict[tuple[str, str], torch.Tensor] = {}
    for key, t in tensors.items():
        name = model.checkpoint_name(key)
        if name is None:
            continue
        m = _PER_EXPERT.search(name)
        if m:
            experts[(m[1], _EXPERT_KIND.get(m[3], m[3]))][int(m[2])] = t
            continue
        m2 = re.search(r"(layers\.\d+\.mlp)\.(gate_proj|up_proj)\.weight$", name)
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


def load_weights(model: DecoderModel, path: str | Path) -> None:
    full = checkpoint_to_params(model, read_safetensors(path))
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(full))
    if missing:
        raise ValueError(f"checkpoint {path} lacks weights for: {', '.join(missing[:8])}")
    for name, p in params.items():
        load_param(p, full[name].to(p.dtype))
