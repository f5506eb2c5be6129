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
)

from dpattn.models.tiny import ensure_default_model


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
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
