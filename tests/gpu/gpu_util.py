"""Helpers of the GPU checks: the CLI as a subprocess, result lines kept under $OUT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

SRC = str(Path(__file__).resolve().parents[2] / "src")


def report(name: str, text: str) -> None:
    """Print a result line and keep it under $OUT when set (scripts/gpu_check.sh sets it)."""
    print(f"\n[{name}] {text}", flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(Path(out) / "gpu_results.txt", "a") as f:
            f.write(f"[{name}] {text}\n")


def dpattn_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`dpattn ARGS` as `python -m dpattn.cli` (no console script needed on the device)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "dpattn.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def last_json(stdout: str) -> Any:
    """The last line of stdout that is a JSON object (the CLI's report)."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON report in: {stdout[-2000:]}")
