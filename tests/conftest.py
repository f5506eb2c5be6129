"""Shared tiny checkpoints (built once per test session)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dpattn.models.tiny import ARCHS, DEEPSEEK_ARCHS, MOE_ARCHS, make_tiny_model

# The suite runs on CPU, also on a GPU host (as in CI; subprocesses inherit it). tests/gpu asks
# for --device cuda explicitly.
os.environ.setdefault("DPATTN_DEVICE", "cpu")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny fused-expert checkpoint per arch (seed 0): arch -> directory."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: make_tiny_model(arch, root / arch, seed=0) for arch in ARCHS}


@pytest.fixture(scope="session")
def per_expert_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The MoE archs with legacy per-expert weight keys (``fused_experts=False``)."""
    root = tmp_path_factory.mktemp("tiny-per-expert")
    return {
        arch: make_tiny_model(arch, root / arch, seed=0, fused_experts=False) for arch in MOE_ARCHS
    }


@pytest.fixture(scope="session")
def mla_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny MLA checkpoints: deepseek_v2 / deepseek_v3 (q-LoRA, per-expert keys, V3 with
    YaRN), and ``deepseek_v3_noq`` (plain q_proj)."""
    root = tmp_path_factory.mktemp("tiny-mla")
    models = {arch: make_tiny_model(arch, root / arch, seed=0) for arch in DEEPSEEK_ARCHS}
    noq = make_tiny_model("deepseek_v3", root / "deepseek_v3_noq", seed=0, q_lora_rank=None)
    return {**models, "deepseek_v3_noq": noq}


@pytest.fixture(scope="session")
def mixed_moe_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """qwen3_moe whose layer 0 is dense (``mlp_only_layers=[0]``) and layer 1 is MoE.

    The one tiny model where ``moe_dense_tp_size=1`` (scattered dense layer) and the world-wide
    MoE layer meet in the same forward.
    """
    root = tmp_path_factory.mktemp("tiny-mixed")
    return make_tiny_model("qwen3_moe", root / "qwen3_moe_mixed", seed=0, mlp_only_layers=[0])


@pytest.fixture(scope="session")
def all_models(tiny_models: dict[str, Path], mixed_moe_model: Path) -> dict[str, Path]:
    """tiny_models plus ``qwen3_moe_mixed`` (dense + MoE layers)."""
    return {**tiny_models, "qwen3_moe_mixed": mixed_moe_model}


FP8_BLOCK = (24, 40)  # not square; the tiny dims (64, 48, 40, 32, 128) leave partial edge blocks


@pytest.fixture(scope="session")
def fp8_models(
    tiny_models: dict[str, Path],
    mla_models: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[Path, Path, Path]]:
    """arch -> (original, FP8 block-wise copy in FP8_BLOCK blocks, its dequantized reference)."""
    from dpattn.models.tiny_fp8 import make_fp8_checkpoint, write_dequantized

    root = tmp_path_factory.mktemp("tiny-fp8")
    out = {}
    for arch, src in [("llama", tiny_models["llama"]), ("deepseek_v3", mla_models["deepseek_v3"])]:
        fp8 = make_fp8_checkpoint(src, root / arch, FP8_BLOCK)
        out[arch] = (src, fp8, write_dequantized(fp8, root / f"{arch}-ref"))
    return out


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gloo: spawns real gloo rank processes (a few s each)")
    config.addinivalue_line(
        "markers", "world4: a 4-process gloo world (runs by default; deselect with -m)"
    )
