"""Never hang (issue 5): a dead rank, a divergent branch and signals all end fast and clean."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpattn.entrypoints.engine import Engine
from dpattn.executor.sampling_params import SamplingParams
from dpattn.runtime.faults import DivergeAt


def _children(pid: int) -> list[int]:
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True
    ).stdout
    return [int(x) for x in out.split()]


@pytest.mark.gloo
@pytest.mark.world4
def test_killed_rank_stops_engine_and_names_it(tiny_models: dict[str, Path]) -> None:
    engine = Engine(str(tiny_models["qwen3_moe"]), 4, 2, backend="gloo", collective_timeout_s=20)
    try:
        assert engine.generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 2})
        rid = engine.submit([5, 6, 7], SamplingParams(max_new_tokens=400, ignore_eos=True))
        victim = engine.ranks.procs[3]
        start = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match="rank 3 died"):
            engine.result(rid, timeout=30)
        deadline = start + 30
        while any(p.is_alive() for p in engine.ranks.procs) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(p.is_alive() for p in engine.ranks.procs)
        assert time.monotonic() - start < 30
        with pytest.raises(RuntimeError, match="rank 3 died"):
            engine.submit([1], SamplingParams())
    finally:
        engine.shutdown()
    assert mp.active_children() == []


@pytest.mark.parametrize("backend", ["thread", pytest.param("gloo", marks=pytest.mark.gloo)])
def test_debug_lockstep_names_divergent_collective(
    tiny_models: dict[str, Path], backend: str
) -> None:
    timeout = 20.0
    engine = Engine(
        str(tiny_models["llama"]),
        2,
        2,
        backend=backend,
        debug_lockstep=True,
        collective_timeout_s=timeout,
        fault=DivergeAt(rank=1, step=3),  # rank 1 takes a wrong branch at step 3
    )
    start = time.monotonic()
    try:
        with pytest.raises(
            RuntimeError, match=r"lock-step divergence in group world: .*all_reduce\[1\]"
        ):
            engine.generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 8})
        assert time.monotonic() - start < timeout
    finally:
        engine.shutdown()


def test_lockstep_on_is_invisible_when_ranks_agree(tiny_models: dict[str, Path]) -> None:
    kwargs = {
        "input_ids": [[1, 2, 3], [4, 5]],
        "sampling_params": {"max_new_tokens": 6, "temperature": 0},
    }
    with Engine(
        str(tiny_models["qwen3_moe"]), 2, 2, backend="thread", debug_lockstep=True
    ) as engine:
        checked = [o["output_ids"] for o in engine.generate(**kwargs)]
    with Engine(str(tiny_models["qwen3_moe"]), 1, 1, backend="thread") as engine:
        plain = [o["output_ids"] for o in engine.generate(**kwargs)]
    assert checked == plain


@pytest.mark.gloo
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_cli_stops_all_ranks(
    tiny_models: dict[str, Path], sig: signal.Signals, tmp_path: Path
) -> None:
    cmd = [sys.executable, "-m", "dpattn.cli", "bench", "--model-path", str(tiny_models["llama"])]
    cmd += [
        "--tp",
        "2",
        "--dp",
        "2",
        "--num-prompts",
        "300",
        "--input-len",
        "8",
        "--output-len",
        "400",
    ]
    # stderr to a file, never an unread pipe: the ranks' step logs would fill it and block them
    log = (tmp_path / "stderr.log").open("w")
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=log,
        start_new_session=True,
        # A pytest started in the background of a script inherits SIGINT ignored, and so would
        # the CLI (Python keeps an ignored SIGINT ignored): give it the terminal's default.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 60
        ranks: list[int] = []
        while time.monotonic() < deadline and len(ranks) < 2:
            time.sleep(0.5)
            # spawned ranks rename themselves (dpattn::scheduler_DP0_TP0) once they start
            ranks = [c for c in _children(proc.pid) if _is_rank(_cmdline(c))]
        assert len(ranks) == 2, "rank processes did not start"
        time.sleep(1.0)
        # Ctrl-C in a terminal reaches the whole process group; SIGTERM only the main process.
        os.killpg(proc.pid, sig) if sig == signal.SIGINT else proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            tail = (tmp_path / "stderr.log").read_text()[-3000:]
            raise AssertionError(f"the CLI did not exit after {sig.name}:\n{tail}") from None
        time.sleep(0.5)
        assert [r for r in ranks if _alive(r)] == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def _is_rank(cmdline: str) -> bool:
    return "spawn_main" in cmdline or "dpattn::scheduler" in cmdline


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.split(")")[-1].split()[0] != "Z"
