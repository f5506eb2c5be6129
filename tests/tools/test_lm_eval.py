"""lm-eval's local-completions against `dpattn serve` (tp=2, dp=2) gives the same per-choice
loglikelihoods as lm-eval's `hf` model on the same checkpoint (docs/eval/dpattn_mc.yaml).

Opt-in (needs lm-eval[api] and accelerate installed; ~2 min on the tiny model, longer on Gemma):
DPATTN_LM_EVAL_TESTS=1 [DPATTN_LM_EVAL=/path/to/lm_eval] [DPATTN_LM_EVAL_MODEL=DIR] pytest ...
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from dpattn.models.tiny import ensure_default_model
from dpattn.runtime.launch import free_port

pytestmark = pytest.mark.skipif(
    not os.environ.get("DPATTN_LM_EVAL_TESTS"), reason="opt-in: DPATTN_LM_EVAL_TESTS=1"
)
ROOT = Path(__file__).resolve().parents[2]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def lm_eval(model: str, model_args: str, out: Path) -> list[float]:
    exe = os.environ.get("DPATTN_LM_EVAL") or shutil.which("lm_eval") or "lm_eval"
    cmd = [exe, "--model", model, "--model_args", model_args, "--tasks", "dpattn_mc"]
    cmd += ["--include_path", "docs/eval", "--log_samples", "--output_path", str(out)]
    subprocess.run(cmd, cwd=ROOT, env={**os.environ, **OFFLINE}, check=True, timeout=1800)
    [samples] = out.glob("*/samples_dpattn_mc_*.jsonl")
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    return [
        float(r[0])
        for row in sorted(rows, key=lambda r: r["doc_id"])
        for r in row["filtered_resps"]
    ]


def test_local_completions_equals_hf(tmp_path: Path) -> None:
    model = os.environ.get("DPATTN_LM_EVAL_MODEL") or str(ensure_default_model())
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "dpattn.cli", "serve", "--model-path", model, "--tp", "2"]
        + ["--dp", "2", "--port", str(port)],
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(1)
        args = f"base_url=http://127.0.0.1:{port}/v1/completions,model={Path(model).name}"
        # both sides tokenize with BOS (Gemma needs it; lm-eval's hf model adds it for Gemma)
        args += f",tokenizer={model},tokenizer_backend=huggingface,num_concurrent=4"
        args += ",add_bos_token=True"
        ours = lm_eval("local-completions", args, tmp_path / "dpattn")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    ref = lm_eval("hf", f"pretrained={model},dtype=float32,add_bos_token=True", tmp_path / "hf")
    assert len(ours) == len(ref) == 4 * 30
    # Sums of a few token logprobs: 1e-4 on the tiny model; Gemma's logits are in the tens, where
    # fp32 order-of-summation differences reach ~2e-4 (docs: verify's atol + rtol * max|logit|).
    tiny = model == str(ensure_default_model())
    assert ours == pytest.approx(ref, abs=1e-4 if tiny else 5e-4)
    pick = [max(range(4), key=lambda j, q=q: v[4 * q + j]) for v in (ours, ref) for q in range(30)]
    assert pick[:30] == pick[30:], "a question's answer differs: the accuracy would too"
