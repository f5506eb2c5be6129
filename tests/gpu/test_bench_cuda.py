"""`dpattn bench --compare-transformers` on CUDA, with and without decode CUDA graphs: tok/s at
batch 1, 16 and 64 against transformers' generate on the same GPU. Prints the figures (and keeps
them under $OUT); asserts only that the runs complete and report, never a speed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from gpu_util import dpattn_cli, last_json, report


@pytest.fixture(scope="module")
def bench_model(tiny_models: dict[str, Path]) -> Path:
    """The real Gemma 3 270M where found, else the tiny llama (the figures then say little)."""
    from dpattn.models.gguf_convert import converted_dir, is_converted

    env = os.environ.get("DPATTN_GEMMA_PATH")
    path = Path(env) if env else converted_dir()
    return path if is_converted(path) or (path / "config.json").is_file() else tiny_models["llama"]


@pytest.mark.timeout(450)  # three engines and transformers twice, in one subprocess
@pytest.mark.parametrize("graphs", [True, False], ids=["cuda-graph", "eager"])
def test_bench_compare_transformers(bench_model: Path, graphs: bool) -> None:
    args = ["bench", "--model-path", str(bench_model), "--device", "cuda", "--compare-transformers"]
    args += ["--num-prompts", "64", "--input-len", "32", "--output-len", "32"]
    args += ["--max-total-tokens", "65536", "--max-running-requests", "64"]
    args += ["--cuda-graph-max-bs", "64", "--cuda-graph-max-seq-len", "512"]
    if not graphs:
        args.append("--disable-cuda-graph")
    run = dpattn_cli(*args, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    rep = last_json(run.stdout)
    rows = rep["vs_transformers"]
    assert {(r["dtype"], r["batch"]) for r in rows} == {
        (d, b) for d in ("float32", "bfloat16") for b in (1, 16, 64)
    }
    assert all(r["device"] == "cuda" and r["cuda_graph"] is graphs for r in rows)
    name = f"bench {bench_model.name} {'graphs' if graphs else 'eager'}"
    for r in rows:
        report(
            name,
            f"{r['dtype']} batch {r['batch']}: dpattn {r['dpattn_tokens_per_s']:.0f} tok/s, "
            f"transformers {r['transformers_tokens_per_s']:.0f} tok/s "
            f"(x{r['dpattn_over_transformers']:.2f})",
        )
    report(name, "offline " + json.dumps({k: v for k, v in rep.items() if k != "vs_transformers"}))
