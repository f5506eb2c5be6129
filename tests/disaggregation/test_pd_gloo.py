"""The README's three-command recipe as real CLIs with gloo rank processes: a prefill server
(1, 1), a decode server (2, 2) and the PD router. Greedy tokens equal a colocated engine's; a
SIGKILLed prefill server fails the decode side's waiting request with its address named, the
decode server keeps serving, and no rank process is left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from pd_servers import wait_for
from proc_harness import alive, children, free_port, wait_healthy
from prometheus_client.parser import text_string_to_metric_families

from dpattn.entrypoints.engine import Engine

PROMPT = list(range(5, 30))


def _start(args: list[str]) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "dpattn.cli", *args, "--log-level", "warning"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kv_used(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "dpattn_kv_cache_used_tokens"
    )


def _generate(url: str, max_new: int = 6) -> httpx.Response:
    body = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": max_new, "temperature": 0}}
    return httpx.post(url + "/generate", json=body, timeout=120)


@pytest.mark.gloo
@pytest.mark.skipif(
    os.environ.get("DPATTN_PD_GLOO") != "1", reason="~35 s of gloo processes: DPATTN_PD_GLOO=1"
)
def test_three_command_recipe_and_a_killed_prefill(tiny_models: dict[str, Path]) -> None:
    model = str(tiny_models["llama"])
    common = ["--model-path", model, "--max-total-tokens", "256", "--disable-radix-cache"]
    p_port, d_port, r_port, boot = free_port(), free_port(), free_port(), free_port()
    prefill = _start(
        ["serve", *common, "--port", str(p_port), "--disaggregation-mode", "prefill"]
        + ["--disaggregation-bootstrap-port", str(boot)]
    )
    decode = _start(
        ["serve", *common, "--tp", "2", "--dp", "2", "--port", str(d_port)]
        + ["--disaggregation-mode", "decode", "--disaggregation-heartbeat-s", "0.2"]
    )
    p_url, d_url = f"http://127.0.0.1:{p_port}", f"http://127.0.0.1:{d_port}"
    router = _start(
        ["router", "--pd-disaggregation", "--prefill", p_url, str(boot), "--decode", d_url]
        + ["--port", str(r_port)]
    )
    r_url = f"http://127.0.0.1:{r_port}"
    procs = [prefill, decode, router]
    try:
        for proc, url in ((prefill, p_url), (decode, d_url), (router, r_url)):
            wait_healthy(proc, url)
        with Engine(model, backend="thread", kv_pool_tokens=256) as ref:
            want = ref.generate(
                input_ids=PROMPT, sampling_params={"max_new_tokens": 6, "temperature": 0}
            )
        got = _generate(r_url).json()
        assert got["output_ids"] == want["output_ids"]  # type: ignore[index]
        client = openai.OpenAI(base_url=r_url + "/v1", api_key="x", max_retries=0, timeout=60)
        kw: dict[str, Any] = dict(model=None, prompt=PROMPT, max_tokens=6, temperature=0)
        full = client.completions.create(**kw).choices[0].text
        streamed = client.completions.create(**kw, stream=True)
        assert "".join(c.choices[0].text for c in streamed if c.choices) == full

        # A decode request whose prefill server dies while it waits for the KV.
        answer: dict[str, httpx.Response] = {}
        boot_fields = dict(bootstrap_host="127.0.0.1", bootstrap_port=boot, bootstrap_room=77)
        body = dict(prompt=PROMPT, max_tokens=4, temperature=0, **boot_fields)
        waiter = threading.Thread(
            target=lambda: answer.setdefault(
                "r", httpx.post(d_url + "/v1/completions", json=body, timeout=60)
            )
        )
        waiter.start()
        time.sleep(1.0)
        ranks = children(prefill.pid)
        prefill.send_signal(signal.SIGKILL)
        waiter.join(timeout=30)
        assert not waiter.is_alive(), "the decode side hung on a dead prefill server"
        resp = answer["r"]
        assert resp.status_code >= 400 and f"127.0.0.1:{boot}" in resp.text, resp.text
        assert wait_for(lambda: not any(alive(r) for r in ranks), 10), "orphan prefill ranks"
        assert httpx.get(d_url + "/health").status_code == 200  # the decode server lives on
        assert wait_for(lambda: _kv_used(d_url) == 0), "the decode side kept KV slots"
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
