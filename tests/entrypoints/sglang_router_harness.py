"""The harness of test_sglang_router.py: sglang-router installed from the package index into a
cached virtualenv of its own, the router and `dpattn serve` as loopback processes (each stopped
with its children, by pid), and Checks, which runs every case of a test and fails once listing
all that failed, with the router's or the worker's answer."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from proc_harness import alive, children, free_port, wait_healthy

ROUTER_VERSION = "0.3.2"


def _cache_dir() -> Path:
    return Path(os.environ.get("DPATTN_CACHE", "~/.cache/dpattn")).expanduser()


def router_python() -> Path:
    """The Python of a virtualenv holding sglang-router ROUTER_VERSION, made once and reused."""
    venv = _cache_dir() / f"sglang-router-{ROUTER_VERSION}"
    python = venv / "bin" / "python"
    marker = venv / ".dpattn-installed"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".sglang-router-{ROUTER_VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one installer at a time (parallel test runs)
        if marker.exists() and python.exists():
            return python
        shutil.rmtree(venv, ignore_errors=True)  # a half-made one from an interrupted run
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
        done = subprocess.run(
            [*pip, f"sglang-router=={ROUTER_VERSION}"],
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, (
            f"pip install sglang-router failed:\n{done.stdout}{done.stderr}"
        )
        marker.write_text(ROUTER_VERSION + "\n")
    return python


def _tail(path: Path, lines: int = 12) -> str:
    """The router log's distinct WARN/ERROR messages (colour codes, times and ids stripped; the
    last `lines`), else its last lines."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", path.read_text(errors="replace")) if path.exists() else ""
    rows = text.splitlines()
    seen: dict[str, None] = {}
    for row in rows:
        if " WARN " in row or " ERROR " in row or "panicked" in row:
            row = re.sub(r"^\S+ \S+\s+", "", row)  # the time stamp
            row = re.sub(r"(request_id|instance_id|latency)=\S+", r"\1=..", row)
            row = re.sub(r" \S+\.rs:\d+:", "", row)  # the router's source locations
            seen.pop(row, None)
            seen[row] = None
    bad = list(seen)
    return "\n".join((bad or rows)[-lines:])


def _stop(proc: subprocess.Popen[Any], timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL; the process's own children (rank processes) too, by pid."""
    kids = children(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 15
    while any(alive(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.1)
    for k in kids:
        if alive(k):
            with contextlib.suppress(ProcessLookupError):
                os.kill(k, signal.SIGKILL)


class Router:
    """`python -m sglang_router.launch_router ARGS` on a loopback port, its log in `log`."""

    def __init__(self, python: Path, log: Path, args: list[str]) -> None:
        port, metrics_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        cmd = [str(python), "-m", "sglang_router.launch_router", "--host", "127.0.0.1"]
        cmd += ["--port", str(port), "--log-level", "info", "--shutdown-grace-period-secs", "5"]
        # Its Prometheus exporter binds 0.0.0.0:29000 unless told: loopback and a free port.
        cmd += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port), *args]
        self.cmd = cmd
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)

    def workers(self) -> list[dict[str, Any]]:
        return list(httpx.get(self.url + "/workers", timeout=5).json().get("workers", []))

    def wait_workers(self, count: int, timeout: float = 90) -> list[dict[str, Any]]:
        """Until the router lists `count` healthy workers (it registers them in the background)."""
        deadline = time.monotonic() + timeout
        seen: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the router exited:\n{_tail(self.log)}"
            with contextlib.suppress(httpx.HTTPError, ValueError):
                seen = self.workers()
                if len(seen) >= count and all(w.get("is_healthy") for w in seen):
                    return seen
            time.sleep(0.5)
        raise AssertionError(
            f"the router registered {len(seen)} of {count} workers in {timeout:.0f} s: "
            f"{[(w.get('url'), w.get('is_healthy')) for w in seen]}\nrouter log:\n{_tail(self.log)}"
        )

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0, timeout=120)

    def stop(self) -> None:
        _stop(self.proc)


@contextlib.contextmanager
def router(python: Path, log: Path, args: list[str]) -> Iterator[Router]:
    r = Router(python, log, args)
    try:
        yield r
    finally:
        r.stop()


def _serve(args: list[str], log: Path) -> subprocess.Popen[Any]:
    cmd = [sys.executable, "-m", "dpattn.cli", "serve", *args, "--log-level", "warning"]
    with open(log, "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)


class Servers:
    """`dpattn serve` processes by name; `url[name]`; all stopped by close()."""

    def __init__(self, model: Path, logs: Path) -> None:
        self.model, self.logs = model, logs
        self.procs: dict[str, subprocess.Popen[Any]] = {}
        self.url: dict[str, str] = {}
        self.bootstrap_port = free_port()  # the prefill server's

    def start(self, name: str, *args: str) -> None:
        port = free_port()
        common = ["--model-path", str(self.model), "--port", str(port), "--host", "127.0.0.1"]
        common += ["--max-total-tokens", "512"]
        self.procs[name] = _serve([*common, *args], self.logs / f"{name}.log")
        self.url[name] = f"http://127.0.0.1:{port}"

    def wait(self) -> None:
        for name, proc in self.procs.items():
            try:
                wait_healthy(proc, self.url[name], timeout=240)
            except AssertionError as e:
                log = (self.logs / f"{name}.log").read_text(errors="replace")[-3000:]
                raise AssertionError(f"dpattn serve {name} did not come up: {e}\n{log}") from e

    def close(self) -> None:
        for proc in self.procs.values():
            _stop(proc)


class Checks:
    """Runs named cases, keeps going after a failure, and fails once at the end with all of
    them: `expected != got`, or the exception's text (the router's or the worker's answer)."""

    def __init__(self, where: str, log: Path | None = None, budget_s: float = 300) -> None:
        self.where, self.log, self.budget_s = where, log, budget_s
        self.deadline = time.monotonic() + budget_s
        self.failures: list[str] = []
        self.ran = 0

    def equal(self, name: str, want: Any, fn: Callable[[], Any]) -> None:
        self.ran += 1
        if time.monotonic() > self.deadline:  # bounded: a broken run must not take an hour
            self.failures.append(f"{name}: not run, the test's {self.budget_s:.0f} s were spent")
            return
        try:
            got = fn()
        except Exception as e:  # noqa: BLE001 - reported below, with its body
            self.failures.append(f"{name}: {type(e).__name__}: {_describe(e)}")
            return
        if got != want:
            self.failures.append(f"{name}: want {want!r}, got {got!r}")

    def true(self, name: str, fn: Callable[[], Any]) -> None:
        self.equal(name, True, lambda: bool(fn()))

    def done(self) -> None:
        if self.failures:
            tail = f"\nrouter log:\n{_tail(self.log)}" if self.log else ""
            head = f"{self.where}: {len(self.failures)} of {self.ran} cases failed"
            pytest.fail("\n  ".join([head, *self.failures]) + tail, pytrace=False)


def _describe(e: Exception) -> str:
    if isinstance(e, openai.APIStatusError):
        return f"HTTP {e.status_code} {e.response.text[:600]}"
    return str(e)[:800]


class Unanswered:
    """A reference answer the server itself did not give: never equal to anything."""

    def __init__(self, error: Exception) -> None:
        self.text = f"{type(error).__name__}: {_describe(error)}"

    def __eq__(self, other: object) -> bool:
        return False

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<no reference: the server answered {self.text}>"


def answer_of(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - kept as the reference, reported where compared
        return Unanswered(e)
