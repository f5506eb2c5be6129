"""The command line a newcomer meets (issue 12): one-line errors with exit code 2, --version,
--log-level debug for the traceback, model paths checked before anything starts, and the
package's public names."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import dpattn
from dpattn.models.model_path import ModelPathError, resolve_model_path
from dpattn.models.tiny import ensure_default_model


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dpattn.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_layout_error_is_one_line() -> None:
    proc = run_cli("generate", "--tp", "3", "--dp", "2", "--prompt", "x")
    assert one_line_error(proc) == "dpattn: error: --tp 3 must be a multiple of --dp 2"


@pytest.mark.parametrize("command", ["generate", "verify", "bench", "serve"])
def test_missing_model_directory_says_so(command: str) -> None:
    args = ["--prompt", "x"] if command == "generate" else []
    proc = run_cli(command, "--model-path", "/nonexistent/model", *args)
    assert (
        one_line_error(proc) == "dpattn: error: model directory /nonexistent/model does not exist"
    )


def test_uncached_hub_id_fails_at_once_with_a_hint(tmp_path: Path) -> None:
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    proc = run_cli("generate", "--model-path", "some-org/some-model", "--prompt", "x", env=env)
    line = one_line_error(proc)
    assert "'some-org/some-model' is not a local directory" in line
    assert "huggingface-cli download some-org/some-model --local-dir DIR" in line


def test_debug_log_level_shows_the_traceback() -> None:
    proc = run_cli("generate", "--tp", "3", "--dp", "2", "--prompt", "x", "--log-level", "debug")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "--tp 3 must be a multiple of --dp 2" in proc.stderr


def test_version() -> None:
    proc = run_cli("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"dpattn {dpattn.__version__}"
    assert dpattn.__version__ not in ("", "0+unknown")


def test_resolve_model_path(tmp_path: Path) -> None:
    tiny = ensure_default_model()
    assert resolve_model_path(tiny) == str(tiny)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelPathError, match="has no config.json"):
        resolve_model_path(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelPathError, match="is a file"):
        resolve_model_path(tmp_path / "file")
    with pytest.raises(ModelPathError, match="does not exist"):
        resolve_model_path("./not/here")


def test_public_names_are_listed_and_import_stays_cheap() -> None:
    names = {"Engine", "EngineConfig", "SamplingParams", "serve", "__version__"}
    assert names <= set(dir(dpattn)) and names <= set(dpattn.__all__)
    assert dpattn.Engine.__name__ == "Engine" and callable(dpattn.serve)
    code = "import sys, dpattn; print('torch' in sys.modules, sorted(dir(dpattn)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    heavy, listed = out.stdout.split(" ", 1)
    assert heavy == "False" and "Engine" in listed  # Engine loads torch only when first used
