"""The command line a newcomer meets (issue 12): one-line errors with exit code 2, --version,
--log-level debug for the traceback, model paths checked before anything starts, request
options (sampling, the bench's workload) checked before any model loads (issue 26), and the
package's public names."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import dpattn
from dpattn.cli import _run, build_parser
from dpattn.cli_errors import run_reporting_errors
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


def test_bad_sampling_option_is_refused_before_the_model_loads(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The model directory does not exist: an answer about the option shows that it was checked
    # first (it used to come after ~27 s of loading the default model). main() minus logging.
    argv = ["generate", "--model-path", "/nonexistent/model", "--prompt", "x"]
    args = build_parser().parse_args([*argv, "--max-new-tokens", "-5"])
    assert run_reporting_errors(lambda: _run(args)) == 2
    assert capsys.readouterr().err == (
        "dpattn: error: --max-new-tokens must be an integer >= 1 "
        "(or 0 to score a prompt's logprobs only)\n"
    )


@pytest.mark.parametrize(
    "argv,message",
    [
        (["generate", "--prompt", "x", "--top-p", "0"], "--top-p must be in \\(0, 1\\]"),
        (["generate", "--prompt", "x", "--seed", "-1"], "--seed must be an integer in"),
        (["generate", "--input-ids", "1,x"], "--input-ids takes comma-separated integers"),
        (["generate"], "give --prompt or --input-ids"),
        (["bench", "--output-len", "-1"], "--output-len must be an integer >= 1"),
        (["bench", "--num-prompts", "0"], "--num-prompts must be at least 1"),
        (["bench", "--range-ratio", "2"], "--range-ratio must be in \\[0, 1\\]"),
        (["bench", "--base-url", "http://127.0.0.1:9", "--concurrency", "0"], "--concurrency"),
        (["bench", "--base-url", "http://127.0.0.1:9", "--request-rate", "0"], "--request-rate"),
    ],
)
def test_request_options_are_checked_first(argv: list[str], message: str) -> None:
    args = build_parser().parse_args([*argv, "--model-path", "/nonexistent/model"])
    with pytest.raises(ValueError, match=message):
        _run(args)  # not ModelPathError: nothing was resolved, let alone loaded


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
