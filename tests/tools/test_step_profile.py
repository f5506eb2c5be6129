"""scripts/step_profile.py (a developer's tool) keeps running: one small CPU profile."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "step_profile.py"


def test_step_profile_splits_a_decode_step(tiny_models: dict[str, Path]) -> None:
    args = ["--model", str(tiny_models["llama"]), "--batch", "4", "--warmup", "3"]
    args += ["--steps", "3", "--profile-steps", "2", "--top", "1000"]
    run = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rep = json.loads(run.stdout.strip().splitlines()[-1])
    assert rep["batch"] == 4 and rep["device"] == "cpu" and rep["forward_device_ms"] is None
    assert rep["step_ms"] >= rep["forward_host_ms"] > 0
    assert "scheduler.py:" in run.stdout  # the host profile (all of it) names the scheduler
