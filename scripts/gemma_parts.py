"""Carry the converted Gemma 3 270M to a machine that cannot download it, in parts.

The converted checkpoint (1 GB of fp32) may be larger than one upload to the GPU machine can be,
and that machine's transformers may convert GGUF differently. So `pack` (here) splits the 253 MB
GGUF into parts and writes a manifest mapping each HF tensor to its GGUF tensor, with the sha256
of the converted tensor; `unpack` (there) dequantizes with the `gguf` package and rebuilds
model.safetensors, refusing any tensor whose bytes differ from the manifest's.

    python scripts/gemma_parts.py pack GGUF CONVERTED_DIR OUT_PREFIX PART_MB
    python scripts/gemma_parts.py unpack GGUF_PARTS_GLOB... --meta DIR --out DIR
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import shutil
from pathlib import Path

import numpy as np
import torch

SMALL_FILES = ("config.json", "generation_config.json", "tokenizer_config.json")
MARKER = "dpattn-gguf-convert.json"


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def pack(gguf: Path, converted: Path, prefix: Path, part_mb: int) -> None:
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import load_file, save_file

    state = load_file(str(converted / "model.safetensors"))
    manifest: dict[str, dict[str, object]] = {}
    for t in GGUFReader(gguf).tensors:
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), np.float32))
        for shape_name, ref in state.items():
            if ref.numel() == w.numel() and shape_name not in manifest:
                cand = w.reshape(ref.shape)
                if torch.equal(cand, ref):
                    manifest[shape_name] = {"gguf": t.name, "shape": list(ref.shape)}
                    break
    raw = {n: t for n, t in state.items() if n not in manifest}  # transformed (e.g. norms)
    meta = prefix.with_name(prefix.name + "_meta")
    meta.mkdir(parents=True, exist_ok=True)
    for name, t in raw.items():
        manifest[name] = {"raw": True, "shape": list(t.shape)}
    for name in manifest:
        manifest[name]["sha256"] = _sha(state[name])
    assert set(manifest) == set(state)
    save_file(raw, str(meta / "raw.safetensors"))
    (meta / "manifest.json").write_text(json.dumps(manifest))
    for f in (*SMALL_FILES, MARKER):
        shutil.copy(converted / f, meta / f)
    with lzma.open(meta / "tokenizer.json.xz", "wb", preset=6) as out:
        out.write((converted / "tokenizer.json").read_bytes())
    data, size = gguf.read_bytes(), part_mb << 20
    for i in range(0, len(data), size):
        part = prefix.with_name(f"{prefix.name}{i // size + 1}")
        part.mkdir(parents=True, exist_ok=True)
        (part / "gguf.part").write_bytes(data[i : i + size])
    print(f"{len(manifest) - len(raw)} tensors from GGUF, {len(raw)} raw; parts of {part_mb} MB")


def unpack(parts: list[Path], meta: Path, out: Path) -> None:
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    gguf = out / "model.gguf"
    with gguf.open("wb") as f:
        for p in parts:
            f.write(p.read_bytes())
    manifest = json.loads((meta / "manifest.json").read_text())
    raw = load_file(str(meta / "raw.safetensors"))
    src = {t.name: t for t in GGUFReader(gguf).tensors}
    tensors: dict[str, torch.Tensor] = {}
    for name, m in manifest.items():
        if m.get("raw"):
            t = raw[name]
        else:
            g = src[m["gguf"]]
            w = np.ascontiguousarray(dequantize(g.data, g.tensor_type), np.float32)
            t = torch.from_numpy(w).reshape(m["shape"])
        if _sha(t) != m["sha256"]:
            raise SystemExit(f"{name}: bytes differ from the packed checkpoint's")
        tensors[name] = t
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    gguf.unlink()
    for f in (*SMALL_FILES, MARKER):
        shutil.copy(meta / f, out / f)
    with lzma.open(meta / "tokenizer.json.xz", "rb") as f:
        (out / "tokenizer.json").write_bytes(f.read())
    print(f"rebuilt {len(tensors)} tensors into {out}, every sha256 equal")


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("gguf", type=Path)
    p.add_argument("converted", type=Path)
    p.add_argument("prefix", type=Path)
    p.add_argument("part_mb", type=int)
    u = sub.add_parser("unpack")
    u.add_argument("parts", type=Path, nargs="+")
    u.add_argument("--meta", type=Path, required=True)
    u.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    if a.cmd == "pack":
        pack(a.gguf, a.converted, a.prefix, a.part_mb)
    else:
        unpack(a.parts, a.meta, a.out)


if __name__ == "__main__":
    main()
