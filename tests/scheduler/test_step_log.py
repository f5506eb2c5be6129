"""The periodic step line (issue 12): SGLang's words, per DP group, tagged `[DP d TP t]`, at
info level; rank processes named `dpattn::scheduler_DP<d>_TP<t>`."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from dpattn.entrypoints.engine import Engine
from dpattn.messages import StepStats
from dpattn.models.tiny import ensure_default_model
from dpattn.scheduler.step_log import StepLog

DECODE = re.compile(
    r"^\[DP (\d) TP (\d)\] Decode batch\. #running-req: \d+, #token: \d+, token usage: "
    r"\d\.\d\d, gen throughput \(token/s\): \d+\.\d\d, #queue-req: \d+$"
)


def test_lines_and_throughput() -> None:
    log = StepLog(kv_total=100, interval=2)
    prefill = StepStats(forward_mode="extend", num_tokens=12, running=0, queued=3)
    assert log.update(prefill, kv_free=88, now=0.0) == (
        "Prefill batch. #new-token: 12, token usage: 0.12, #running-req: 0, #queue-req: 3"
    )
    decode = StepStats(forward_mode="decode", num_tokens=4, running=4, queued=1)
    assert log.update(decode, kv_free=84, now=1.0) is None  # every `interval` decode steps
    assert log.update(decode, kv_free=80, now=2.0) == (
        "Decode batch. #running-req: 4, #token: 20, token usage: 0.20, "
        "gen throughput (token/s): 8.00, #queue-req: 1"  # 8 tokens since the first decode
    )
    assert log.update(StepStats(forward_mode="idle"), kv_free=80, now=3.0) is None


def test_each_dp_group_leader_logs_tagged_lines(caplog: pytest.LogCaptureFixture) -> None:
    # Thread backend: the ranks log through this process's logging, so caplog sees them.
    with caplog.at_level(logging.INFO, logger="dpattn"):
        with Engine(str(ensure_default_model()), 2, 2, backend="thread", log_interval=2) as engine:
            params = {"max_new_tokens": 6, "ignore_eos": True, "temperature": 0}
            engine.generate(input_ids=[[5, 6, 7]] * 2, sampling_params=params, dp_rank=[0, 1])
    lines = [r.getMessage() for r in caplog.records if "batch." in r.getMessage()]
    decode = {DECODE.match(line).groups() for line in lines if "Decode" in line}  # type: ignore[union-attr]
    assert decode == {("0", "0"), ("1", "1")}, lines  # the leaders: rank 0 and rank 1 (A = 1)
    assert all(r.levelno == logging.INFO for r in caplog.records if "batch." in r.getMessage())
    assert any(line.startswith("[DP 0 TP 0] Prefill batch. #new-token: 3") for line in lines)


@pytest.mark.gloo
def test_rank_processes_are_named() -> None:
    pytest.importorskip("setproctitle")
    with Engine(str(ensure_default_model()), 2, 2, backend="gloo") as engine:
        titles = set()
        for p in engine.ranks.procs:
            titles.add(Path(f"/proc/{p.pid}/cmdline").read_bytes().split(b"\0")[0].decode())
    assert titles == {"dpattn::scheduler_DP0_TP0", "dpattn::scheduler_DP1_TP1"}
