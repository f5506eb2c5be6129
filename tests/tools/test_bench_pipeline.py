"""`dpattn bench --pp-size 2`: the report's pipeline figures (each stage's busy fraction, the
output messages sent vs skipped); a prompt of 17 chunks skips the message of its first 16."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dpattn.cli import main
from dpattn.models.tiny import make_tiny_model

CHUNK = 8
CHUNKS = 17


@pytest.fixture(scope="module")
def moe4(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("bench-pp") / "moe4"
    return str(make_tiny_model("qwen3_moe", out, seed=1, num_hidden_layers=4, mlp_only_layers=[0]))


def _bench(capsys: pytest.CaptureFixture[str], model: str, *flags: str) -> dict[str, Any]:
    argv = ["bench", "--model-path", model, "--backend", "thread", *flags]
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_long_prompt_at_pp2(moe4: str, capsys: pytest.CaptureFixture[str]) -> None:
    flags = ["--pp-size", "2", "--chunked-prefill-size", str(CHUNK), "--num-prompts", "1"]
    flags += ["--input-len", str(CHUNKS * CHUNK), "--output-len", "3"]
    report = _bench(capsys, moe4, *flags)
    assert report["layout"]["pp"] == 2
    pipe = report["pipeline"]
    assert len(pipe["stages"]) == 2
    for stage in pipe["stages"]:
        assert 0 < stage["busy_s"] <= stage["active_s"]
        assert 0 < stage["busy_fraction"] <= 1
    # the first 16 chunks produce nothing; the last one and the decode steps send their tokens
    assert pipe["output_messages_skipped"] >= 15
    assert pipe["output_messages_skipped"] == CHUNKS - 1
    assert pipe["output_messages_sent"] >= 3  # the last chunk's token, then 2 decode steps


def test_no_pipeline_figures_at_pp1(moe4: str, capsys: pytest.CaptureFixture[str]) -> None:
    report = _bench(capsys, moe4, "--num-prompts", "2", "--input-len", "5", "--output-len", "2")
    assert report["layout"]["pp"] == 1 and report["pipeline"] is None
