"""`dpattn serve` exits when a rank dies (issue 11, item 3): non-zero, the rank and its signal in
the log, no process left behind; `--keep-alive-on-engine-death` keeps answering 503 instead."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest
from proc_harness import alive, children, free_port, wait_healthy
from server_harness import _wait_for

from dpattn.models.tiny import ensure_default_model

EXIT_DEADLINE_S = 30  # the requirement is 10 s; a loaded CI machine gets slack (measured: README)


def _start(*extra: str) -> tuple[subprocess.Popen[str], str, list[int]]:
    port = free_port()
    cmd = [sys.executable, "-m", "dpattn.cli", "serve", "--tp", "2", "--dp", "2"]
    cmd += ["--model-path", str(ensure_default_model()), "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url)
    deadline = time.monotonic() + 10
    while len(ranks := _rank_pids(proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)  # the process titles are set once a rank has started
    assert len(ranks) == 2, ranks
    return proc, url, ranks


def _rank_pids(parent: int) -> list[int]:
    """The rank processes in rank order, by their titles (dpattn::scheduler_DP{d}_TP{rank})."""
    found = {}
    for pid in children(parent):
        m = re.search(r"dpattn::scheduler_DP\d+_TP(\d+)", _cmdline(pid))
        if m:
            found[int(m.group(1))] = pid
    return [found[r] for r in sorted(found)]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read().replace("\0", " ")
    except OSError:
        return ""


@pytest.mark.gloo
@pytest.mark.parametrize("victim,sig", [(1, signal.SIGKILL), (0, signal.SIGTERM)])
def test_serve_exits_nonzero_when_a_rank_dies(victim: int, sig: signal.Signals) -> None:
    proc, url, ranks = _start()
    try:
        assert httpx.post(
            url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}
        ).is_success
        os.kill(ranks[victim], sig)
        code = proc.wait(timeout=EXIT_DEADLINE_S)
        out = proc.stdout.read()  # type: ignore[union-attr]
        assert code != 0, out
        assert f"rank {victim} died (killed by {sig.name})" in out, out
        assert _wait_for(lambda: not any(alive(r) for r in ranks), 5), "orphan rank processes"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.gloo
def test_keep_alive_on_engine_death_keeps_answering_503() -> None:
    proc, url, ranks = _start("--keep-alive-on-engine-death")
    try:
        os.kill(ranks[1], signal.SIGKILL)
        assert _wait_for(lambda: httpx.get(url + "/health").status_code == 503, 10)
        assert "rank 1 died" in httpx.get(url + "/health").json()["error"]["message"]
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        assert _wait_for(lambda: not any(alive(r) for r in ranks), 5), "orphan rank processes"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
