"""Quantization options that do not fit the checkpoint or the layout (commit 3bc3bce): each is a
QuantizationError (a ValueError: CLI exit 2, one line) naming the problem, raised before any rank
starts; a group size that does not divide a projection's input width names the layer."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from test_cli import one_line_error, run_cli

from dpattn.entrypoints.engine import Engine
from dpattn.models.quantized import (
    GGUF_SIDECAR,
    QuantizationError,
    checkpoint_quantization,
    resolve_quantization,
)
from dpattn.models.tiny_fp8 import make_fp8_checkpoint
from dpattn.tools.verify import VerifyConfig, verify

# (the thread backend can leave its format behind: tests/conftest.py)
GROUP_ERROR = r"^(embed_tokens|lm_head|layers\.\d+\.[\w.]+): group size 256 does not divide "
GROUP_ERROR += r"the input width 64 \(this rank's shard; --quant-group-size must divide"


@pytest.fixture(scope="module")
def fp8_llama(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fp8_checkpoint(
        tiny_models["llama"], tmp_path_factory.mktemp("q-input") / "fp8", (32, 32)
    )


def test_the_checkpoints_own_format(tiny_models: dict[str, Path], fp8_llama: Path) -> None:
    llama = tiny_models["llama"]
    assert checkpoint_quantization(llama) == "none"
    assert checkpoint_quantization(fp8_llama) == "fp8"
    assert resolve_quantization(llama, None) == "none"
    assert resolve_quantization(fp8_llama, None) == "fp8"
    for method in ("none", "int8", "int4"):
        assert resolve_quantization(llama, method) == method


def test_gguf_on_a_plain_checkpoint(tiny_models: dict[str, Path]) -> None:
    llama = tiny_models["llama"]
    with pytest.raises(QuantizationError) as e:
        resolve_quantization(llama, "gguf")
    assert str(e.value) == f"--quantization gguf: {llama} is not a GGUF model (no {GGUF_SIDECAR})"
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("which", ["plain", "fp8"])
def test_gguf_or_fp8_where_the_weights_are_not(
    tiny_models: dict[str, Path], fp8_llama: Path, which: str
) -> None:
    """fp8 on a plain checkpoint; gguf on an FP8 one (no sidecar either)."""
    if which == "plain":
        path, method, says = tiny_models["llama"], "fp8", "has no FP8 weights"
    else:
        path, method, says = fp8_llama, "gguf", "is not a GGUF model"
    with pytest.raises(QuantizationError, match=f"--quantization {method}: .*{says}"):
        resolve_quantization(path, method)


@pytest.mark.parametrize("method", ["none", "int8", "int4"])
def test_other_methods_on_an_fp8_checkpoint(fp8_llama: Path, method: str) -> None:
    """none would read fp8 as plain weights, int8 / int4 would quantize twice."""
    with pytest.raises(QuantizationError) as e:
        resolve_quantization(fp8_llama, method)
    assert str(e.value) == f"{fp8_llama} is an FP8 checkpoint: run it with --quantization fp8"


def test_unknown_method_and_unsupported_checkpoint(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(QuantizationError, match=r"--quantization 'int3': one of none, gguf"):
        resolve_quantization(tiny_models["llama"], "int3")
    gptq = tmp_path / "gptq"
    gptq.mkdir()
    config = json.loads((tiny_models["llama"] / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (gptq / "config.json").write_text(json.dumps(config))
    for requested in (None, "int4"):
        with pytest.raises(QuantizationError, match=r"unsupported checkpoint: .*'gptq'"):
            resolve_quantization(gptq, requested)


def test_refused_before_any_rank_starts(tiny_models: dict[str, Path], fp8_llama: Path) -> None:
    """Engine and verify resolve the method first: no rank, no model load."""
    with pytest.raises(QuantizationError, match="is not a GGUF model"):
        Engine(str(tiny_models["llama"]), 2, 2, backend="thread", quantization="gguf")
    with pytest.raises(QuantizationError, match="is an FP8 checkpoint"):
        verify(VerifyConfig(str(fp8_llama), backend="thread", quantization="int4"))


def test_cli_gguf_on_a_plain_checkpoint(tiny_models: dict[str, Path]) -> None:
    llama = tiny_models["llama"]
    proc = run_cli("verify", "--model-path", str(llama), "--quantization", "gguf")
    assert one_line_error(proc) == (
        f"dpattn: error: --quantization gguf: {llama} is not a GGUF model (no {GGUF_SIDECAR})"
    )


# --------------------------------------------------------------------------- group sizes


def test_group_size_that_does_not_divide_the_width(tiny_models: dict[str, Path]) -> None:
    """int4 in groups of 256 on hidden size 64: the rank's ValueError reaches verify's caller
    and the Engine's (engine failed to start) with the layer's name."""
    model = str(tiny_models["llama"])
    with pytest.raises(ValueError, match=GROUP_ERROR):
        verify(
            VerifyConfig(model, 2, 2, backend="thread", quantization="int4", quant_group_size=256)
        )
    with pytest.raises(RuntimeError) as e:
        Engine(model, 1, 1, backend="thread", quantization="int4", quant_group_size=256)
    prefix = "engine failed to start: rank 0: "  # the rank that raised it, as on gloo
    message = str(e.value)
    assert message.startswith(prefix) and re.match(GROUP_ERROR, message[len(prefix) :]), message


def test_cli_group_size(tiny_models: dict[str, Path]) -> None:
    proc = run_cli(
        "verify", "--model-path", str(tiny_models["llama"]), "--backend", "thread",
        "--quantization", "int4", "--quant-group-size", "256",
    )  # fmt: skip
    line = one_line_error(proc)
    prefix = "dpattn: error: "
    assert line.startswith(prefix) and re.match(GROUP_ERROR, line[len(prefix) :]), line


def test_group_size_that_does_not_divide_a_shard(tiny_models: dict[str, Path]) -> None:
    """qwen3_moe's experts (moe_intermediate_size 32) split over tp=2 without EP: each rank's
    down_proj shard is 16 wide, which groups of 32 do not divide (the checkpoint's 32 they do).
    The error names the MoE layer and the shard's width; with EP the whole experts fit
    (tests/tools/test_verify_quant.py)."""
    model = str(tiny_models["qwen3_moe"])
    cfg = VerifyConfig(model, 2, 2, backend="thread", quantization="int4", quant_group_size=32)
    with pytest.raises(
        ValueError, match=r"^layers\.\d+\.mlp: group size 32 .* width 16 \(this rank's shard"
    ):
        verify(cfg)


def test_a_copy_without_the_sidecar_is_plain(tiny_models: dict[str, Path], tmp_path: Path):
    """The sidecar alone makes a directory GGUF: a copy of a plain model stays plain."""
    copy = shutil.copytree(tiny_models["llama"], tmp_path / "copy")
    assert checkpoint_quantization(copy) == "none"
    (copy / GGUF_SIDECAR).write_bytes(b"")  # only its presence is checked here
    assert checkpoint_quantization(copy) == "gguf"
    assert resolve_quantization(copy, None) == "gguf"
