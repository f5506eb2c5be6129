"""`dpattn serve` as a real CLI with gloo rank processes: it serves, and SIGTERM leaves no
orphans."""

from __future__ import annotations

import signal
import subprocess
import sys
from typing import Any

import openai
import pytest
from proc_harness import alive, children, free_port, wait_healthy
from server_harness import (
    MODEL,
    _m,
    _metrics,
    _rank,
    _stream_texts,
    _wait_for,
    reported_kv,
)

from dpattn.config import RunnerConfig
from dpattn.distributed.parallel_state import Layout, ParallelState
from dpattn.executor.model_runner import ModelRunner
from dpattn.models.tiny import ensure_default_model
from dpattn.runtime.launch import run_ranks


def runner_kv_bytes_per_token() -> int:
    def fn(ps: ParallelState) -> int:
        runner = ModelRunner(RunnerConfig(str(ensure_default_model()), kv_pool_tokens=16), ps)
        return runner.kv_budget.bytes_per_token

    return int(run_ranks(fn, Layout(1, 1), "thread")[0])


# ---- the real CLI with gloo rank processes ----
@pytest.mark.gloo
def test_cli_serve_gloo_dp2_and_clean_shutdown() -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "dpattn.cli", "serve", "--tp", "2", "--dp", "2"]
    cmd += ["--model-path", str(ensure_default_model())]  # the real default may be installed
    cmd += ["--port", str(port), "--log-level", "warning", "--max-queued-requests", "8"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url)
        ranks = children(proc.pid)
        assert len(ranks) >= 2
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        kw: dict[str, Any] = dict(model=MODEL, prompt="A small model", max_tokens=12, seed=1)
        full = client.completions.create(**kw)
        assert _stream_texts(client.completions.create(**kw, stream=True))[0] == {
            0: full.choices[0].text
        }
        chat = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hello!"}], max_tokens=6
        )
        assert chat.usage.completion_tokens == 6
        m = _metrics(url)
        assert all(
            _m(m, "dpattn_forward_steps_total", **_rank(d, mode="extend")) >= 1 for d in (0, 1)
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) in (0, 128 + signal.SIGTERM, -signal.SIGTERM)
        assert _wait_for(lambda: not any(alive(r) for r in ranks), 5), "orphan rank processes"
        assert proc.stdout is not None
        printed = [line for line in proc.stdout.read().splitlines() if "KV cache:" in line]
        assert len(printed) == 1 and printed[0].startswith("dpattn serve: KV cache: ")
        per_token, per_group, system = reported_kv(printed[0])
        # A = 1: a rank holds all KV heads of its group's requests, as a single-rank runner
        assert per_token == runner_kv_bytes_per_token() and system == 2 * per_group
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
