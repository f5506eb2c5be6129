"""GPU checks (issue 16): every test here needs CUDA and is skipped without it.

Run them on a one-GPU machine with `scripts/gpu_check.sh`. They use the tiny checkpoints of
tests/conftest.py and, where it is found, the real Gemma 3 270M (`gemma_model` below).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run scripts/gpu_check.sh on one)")
    for item in items:
        if "tests/gpu/" in str(item.path).replace(os.sep, "/"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def gemma_model() -> Path:
    """The converted Gemma 3 270M: $DPATTN_GEMMA_PATH, else the conversion cache (see
    models/gguf_convert.py); skipped where neither holds it (a GPU machine without network
    access gets it from scripts/gpu_session.sh)."""
    from dpattn.models.gguf_convert import converted_dir, is_converted

    env = os.environ.get("DPATTN_GEMMA_PATH")
    path = Path(env) if env else converted_dir()
    if not is_converted(path) and not (path / "config.json").is_file():
        pytest.skip(f"Gemma 3 270M not found at {path} (set DPATTN_GEMMA_PATH)")
    return path


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/models' tiny Gemma 3 (sliding window 4, sliding and global layers)."""
    import importlib.util

    source = Path(__file__).parents[1] / "models" / "test_gemma3.py"
    spec = importlib.util.spec_from_file_location("_tiny_gemma3_source", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_tiny_gemma3(tmp_path_factory.mktemp("gemma3") / "tiny")
