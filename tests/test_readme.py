"""The README's Python example runs as written (issue 12), pasted into a file; without its
`if __name__ == "__main__":` guard the spawned ranks say what is missing."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from dpattn.models.tiny import ensure_default_model

README = Path(__file__).resolve().parents[1] / "README.md"


def python_example() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "no Python block in the README's Python API section"
    return match.group(1)


def run(script: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=script.parent,
    )


def test_python_example_runs_as_written(tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(python_example())
    proc = run(script)
    assert proc.returncode == 0, proc.stderr
    assert "'finish_reason': 'length'" in proc.stdout and "'completion_tokens': 16" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_missing_guard_is_named(tmp_path: Path) -> None:
    script = tmp_path / "unguarded.py"
    script.write_text(
        "import dpattn\n"
        f"engine = dpattn.Engine({str(ensure_default_model())!r}, collective_timeout_s=20)\n"
        "engine.shutdown()\n"
    )
    proc = run(script)
    assert proc.returncode != 0
    assert 'create the Engine under `if __name__ == "__main__":`' in proc.stderr, proc.stderr
