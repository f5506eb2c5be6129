"""--pp-size and --pp-layer-partition on the command line (issue 27): the flags parse into the
configs, and a pipeline that does not fit the model is refused before any rank starts, in one
line with exit code 2 (the model's layers are read from its config alone)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpattn.cli import _run, build_parser, engine_options
from dpattn.cli_errors import run_reporting_errors
from dpattn.config import EngineConfig
from dpattn.models.stage import StagePartitionError
from dpattn.runtime.topology import check_pipeline


@pytest.mark.parametrize("command", ["verify", "generate", "bench", "serve"])
def test_pipeline_flags_parse(command: str) -> None:
    args = build_parser().parse_args([command, "--pp-size", "2", "--pp-layer-partition", "3,1"])
    assert (args.pp_size, args.pp_layer_partition) == (2, [3, 1])
    defaults = build_parser().parse_args([command])
    assert (defaults.pp_size, defaults.pp_layer_partition) == (1, None)


def test_pipeline_options_reach_the_configs() -> None:
    args = build_parser().parse_args(["serve", "--pp-size", "3", "--pp-layer-partition", "1,2,1"])
    options = engine_options(args)
    cfg = EngineConfig.from_options("m", **options)
    assert cfg.pp_size == 3 and cfg.runner.pp_layer_partition == [1, 2, 1]


def test_partition_that_is_not_a_list_of_integers(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["verify", "--pp-layer-partition", "2,x"])
    assert exc.value.code == 2
    assert "--pp-layer-partition: '2,x' is not a comma-separated list of integers" in (
        capsys.readouterr().err
    )


# The tiny checkpoints have 2 decoder layers.
REFUSED = [
    (
        ["--pp-size", "3"],
        "--pp-size 3 is larger than the model's 2 decoder layers (every stage needs at least one)",
    ),
    (
        ["--pp-size", "2", "--pp-layer-partition", "2,1"],
        "--pp-layer-partition 2,1 sums to 3, but the model has 2 decoder layers",
    ),
    (
        ["--pp-size", "2", "--pp-layer-partition", "2"],
        "--pp-layer-partition 2 has 1 entries; --pp-size 2 needs 2",
    ),
    (["--pp-size", "0"], "--pp-size must be at least 1, got 0"),
]


@pytest.mark.parametrize(
    "flags,message", REFUSED, ids=lambda v: "_".join(v) if isinstance(v, list) else ""
)
@pytest.mark.parametrize("command", ["verify", "generate", "serve"])
def test_pipeline_that_does_not_fit_is_one_line(
    tiny_models: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    command: str,
    flags: list[str],
    message: str,
) -> None:
    """main() minus logging: refused where the model's config is read, before anything starts
    (generate and serve in Engine(), verify before its ranks)."""
    extra = ["--prompt", "x"] if command == "generate" else []
    argv = [command, "--model-path", str(tiny_models["llama"]), "--backend", "thread"]
    args = build_parser().parse_args([*argv, *extra, *flags])
    assert run_reporting_errors(lambda: _run(args)) == 2
    assert capsys.readouterr().err == f"dpattn: error: {message}\n"


def test_cli_exits_2_with_one_line(tiny_models: dict[str, Path]) -> None:
    """The real command line, in its own process."""
    proc = subprocess.run(
        [sys.executable, "-m", "dpattn.cli", "verify", "--pp-size", "99"]
        + ["--model-path", str(tiny_models["llama"])],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ},
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "dpattn: error: --pp-size 99 is larger than the model's 2 decoder layers "
        "(every stage needs at least one)"
    ]


def test_check_pipeline(tiny_models: dict[str, Path]) -> None:
    model = str(tiny_models["llama"])
    check_pipeline(EngineConfig.from_options(model, pp_size=2))  # fits: nothing raised
    check_pipeline(EngineConfig.from_options(model, pp_layer_partition=[2]))
    with pytest.raises(StagePartitionError, match="sums to 1"):
        check_pipeline(EngineConfig.from_options(model, pp_layer_partition=[1]))
    decode = EngineConfig.from_options(model, pp_size=2, disaggregation_mode="decode")
    with pytest.raises(ValueError, match="--disaggregation-mode decode"):
        check_pipeline(decode)
