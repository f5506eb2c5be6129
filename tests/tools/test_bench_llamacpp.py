"""`dpattn bench --compare-llamacpp` without llama-cpp-python: the driver's JSON-lines protocol
(a fake runner), the alternation against a fake driver process and a fake engine, the build's
install command, and the option checks (exit 2 off the default model). Nothing here installs
llama-cpp-python."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dpattn.cli import main
from dpattn.tools import bench_llamacpp as bl
from dpattn.tools import llamacpp_client as lc
from dpattn.tools import llamacpp_driver as driver_mod

SECONDS = 0.04  # what the fake llama.cpp reports per generate


class FakeRunner:
    """The driver's Runner, minus llama.cpp: each prompt's next token is its first id."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[list[int]], int]] = []

    def generate(self, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
        if any(not p for p in prompts):
            raise ValueError("empty prompt")
        self.calls.append((prompts, new_tokens))
        ids = [[p[0]] * new_tokens for p in prompts]
        return {"seconds": SECONDS, "output_ids": ids, "peak_rss_mb": 123.0}

    def info(self) -> dict[str, Any]:
        return {"version": "fake", "n_vocab": 1000, "load_s": 0.0, "peak_rss_mb": 123.0}


def test_driver_protocol() -> None:
    runner = FakeRunner()
    requests = [
        {"op": "generate", "prompts": [[5, 6], [7, 8]], "new_tokens": 3},
        {"op": "info"},
        {"op": "generate", "prompts": [[]], "new_tokens": 3},
        {"op": "nope"},
        {"op": "quit"},
        {"op": "info"},  # after quit: not answered
    ]
    replies = io.StringIO()
    driver_mod.serve(runner, io.StringIO("".join(json.dumps(r) + "\n" for r in requests)), replies)
    got = [json.loads(line) for line in replies.getvalue().splitlines()]
    assert len(got) == 5
    assert got[0]["ok"] and got[0]["output_ids"] == [[5, 5, 5], [7, 7, 7]]
    assert got[1]["ok"] and got[1]["version"] == "fake"
    assert not got[2]["ok"] and "empty prompt" in got[2]["error"]
    assert not got[3]["ok"] and "unknown op" in got[3]["error"]
    assert got[4] == {"ok": True}
    assert runner.calls == [([[5, 6], [7, 8]], 3)]


def _fake_driver_command(tmp_path: Path) -> list[str]:
    """A driver process speaking the real protocol (llamacpp_driver.serve, imported by path as
    the venv's Python runs it: no dpattn) over FakeRunner's logic."""
    script = tmp_path / "fake_driver.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, sys
            sys.path.insert(0, {str(Path(driver_mod.__file__).parent)!r})
            import llamacpp_driver as d

            class Runner:
                def generate(self, prompts, new_tokens):
                    ids = [[p[0]] * new_tokens for p in prompts]
                    return {{"seconds": {SECONDS}, "output_ids": ids, "peak_rss_mb": 123.0}}

                def info(self):
                    return {{"version": "fake", "n_vocab": 1000, "peak_rss_mb": 123.0}}

            assert "dpattn" not in sys.modules and "torch" not in sys.modules
            print(json.dumps({{"ready": True, **Runner().info()}}), flush=True)
            d.serve(Runner(), sys.stdin, sys.stdout)
            """
        )
    )
    return [sys.executable, str(script)]


class FakeEngine:
    def __init__(self, log: list[tuple[str, list[list[int]], int]]) -> None:
        self.log = log

    def generate(self, input_ids: list[list[int]], sampling_params: dict[str, Any]) -> Any:
        assert sampling_params["temperature"] == 0 and sampling_params["ignore_eos"]
        n = sampling_params["max_new_tokens"]
        self.log.append(("dpattn", input_ids, n))
        return [{"output_ids": [p[0]] * n} for p in input_ids]


class LoggedDriver(lc.LlamaCppDriver):
    def __init__(self, log: list[Any], command: list[str]) -> None:
        super().__init__("python", "model.gguf", 2, command=command, timeout_s=60)
        self.log = log

    def generate(self, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
        self.log.append(("llamacpp", prompts, new_tokens))
        return super().generate(prompts, new_tokens)


def test_alternation_against_a_fake_driver(tmp_path: Path) -> None:
    log: list[tuple[str, list[list[int]], int]] = []
    with LoggedDriver(log, _fake_driver_command(tmp_path)) as driver:
        assert driver.info["ready"] and driver.info["n_vocab"] == 1000
        rows = bl.compare_with_llamacpp(
            FakeEngine(log),
            driver,
            vocab=1000,
            batch_sizes=(1, 3),
            new_tokens=5,
            prompt_len=4,
            repeats=2,
            rss=lambda: [456.0],
            progress=False,
        )
        assert driver.peak_rss_mb() == 123.0
    assert driver.proc.returncode == 0  # told to quit, it quit
    assert [r["batch"] for r in rows] == [1, 3]
    for r in rows:
        assert r["llamacpp_tokens_per_s"] == pytest.approx(r["batch"] * 5 / SECONDS)
        assert r["dpattn_tokens_per_s"] > 0 and len(r["dpattn_over_llamacpp_each"]) == 2
        assert r["first_token_agreement"] == 1.0
        assert r["dpattn_rank_peak_rss_mb"] == [456.0] and r["llamacpp_peak_rss_mb"] == 123.0
    # per batch size: both warmed up (4 tokens), then rounds alternating dpattn, llama.cpp on
    # the same fresh prompts
    assert [(side, len(p), n) for side, p, n in log] == [
        (side, b, n) for b in (1, 3) for n in (4, 5, 5) for side in ("dpattn", "llamacpp")
    ]
    for ours, theirs in zip(log[::2], log[1::2]):
        assert ours[1] == theirs[1] and all(len(p) == 4 for p in ours[1])
    prompts = [tuple(map(tuple, p)) for side, p, _ in log if side == "dpattn"]
    assert len(set(prompts)) == len(prompts)  # fresh prompts every time


def test_driver_death_is_reported(tmp_path: Path) -> None:
    crash = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]
    with pytest.raises(lc.DriverError, match="SIGSEGV"):
        lc.LlamaCppDriver("python", "model.gguf", 2, command=crash, timeout_s=60)
    refuse = [sys.executable, "-c", 'print(\'{"ready": false, "error": "no model"}\')']
    with pytest.raises(lc.DriverError, match="no model"):
        lc.LlamaCppDriver("python", "model.gguf", 2, command=refuse, timeout_s=60)


def test_install_command_builds_from_source(tmp_path: Path) -> None:
    cmd, env = lc.install_command(Path("/venv/bin/python"), lc.build_cmake_args(tmp_path))
    assert cmd[:4] == ["/venv/bin/python", "-m", "pip", "install"]
    assert "--no-cache-dir" in cmd and f"llama-cpp-python=={lc.LLAMACPP_VERSION}" in cmd
    assert cmd[cmd.index("--no-binary") + 1] == "llama-cpp-python"
    assert "-DGGML_NATIVE=ON" in env["CMAKE_ARGS"].split()
    assert f"-DCMAKE_CXX_FLAGS=-isystem{tmp_path}" in env["CMAKE_ARGS"].split()
    assert "isystem" not in " ".join(lc.build_cmake_args(None))


def _fake_compiler(tmp_path: Path, header: str) -> str:
    include = tmp_path / "include"
    include.mkdir(parents=True)
    (include / "amxtileintrin.h").write_text(header)
    cc = tmp_path / "cc"
    cc.write_text(f"#!/bin/sh\necho {include}\n")
    cc.chmod(0o755)
    return str(cc)


def test_tilecfg_header_fix(tmp_path: Path) -> None:
    buggy = (
        '__asm__ volatile ("ldtilecfg\\t%X0" :: "m" (*((const void **)__config)));\n'
        '__asm__ volatile ("sttilecfg\\t%X0" : "=m" (*((void **)__config)));\n'
    )
    fixed = lc.tilecfg_header_fix(tmp_path / "fix", _fake_compiler(tmp_path / "a", buggy))
    assert fixed == tmp_path / "fix"
    text = (fixed / "amxtileintrin.h").read_text()
    assert "(const char (*)[64])__config" in text and "(char (*)[64])__config" in text
    assert "void **" not in text
    good = '__asm__ volatile ("ldtilecfg\\t%X0" :: "m" (*((const char (*)[64])__config)));\n'
    assert lc.tilecfg_header_fix(tmp_path / "fix2", _fake_compiler(tmp_path / "b", good)) is None
    assert lc.tilecfg_header_fix(tmp_path / "fix3", str(tmp_path / "no-such-cc")) is None


def test_installed_venv_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DPATTN_CACHE", str(tmp_path))
    venv = lc.venv_dir()
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    (venv / lc.MARKER).write_text(json.dumps({"cmake_args": ["-DGGML_NATIVE=ON"]}))

    def no_install(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"installed: {args}")

    monkeypatch.setattr(subprocess, "run", no_install)
    assert lc.llamacpp_python(tmp_path / "model.gguf", progress=False) == venv / "bin" / "python"
    assert lc.build_info()["cmake_args"] == ["-DGGML_NATIVE=ON"]


def _bench(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(["bench", "--compare-llamacpp", *args, "--log-level", "warning"])
    return rc, capsys.readouterr().err.strip()


def test_cli_refuses_other_models(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DPATTN_CACHE", str(tmp_path / "cache"))
    rc, err = _bench("--model-path", str(tmp_path), capsys=capsys)
    assert rc == 2 and len(err.splitlines()) == 1
    assert err.startswith("dpattn: error: --compare-llamacpp runs the default model")
    rc, err = _bench("--compare-transformers", capsys=capsys)
    assert rc == 2 and "not with --compare-transformers" in err
    rc, err = _bench("--compare-repeats", "0", capsys=capsys)
    assert rc == 2 and "--compare-repeats" in err


def test_default_model_is_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DPATTN_CACHE", str(tmp_path))
    monkeypatch.setattr(bl, "package_installed", lambda: True)
    default = SimpleNamespace(
        base_url=None,
        compare_transformers=False,
        compare_dp_attention=False,
        compare_prefix_cache=False,
        compare_routing=False,
        model_path=str(tmp_path / "x" / ".." / bl.converted_dir().name),
        device="cpu",
        nnodes=1,
    )
    bl.check_options(default)  # the default model's directory, however spelled
    bl.check_options(SimpleNamespace(**{**vars(default), "model_path": None}))
    with pytest.raises(ValueError, match="--device cpu"):
        bl.check_options(SimpleNamespace(**{**vars(default), "device": "cuda"}))
    monkeypatch.setattr(bl, "package_installed", lambda: False)
    with pytest.raises(ValueError, match="dpattn\\[model\\]"):
        bl.check_options(default)


def test_format_table() -> None:
    row = {
        "batch": 16,
        "dpattn_tokens_per_s": 100.0,
        "llamacpp_tokens_per_s": 200.0,
        "dpattn_over_llamacpp": 0.5,
        "dpattn_over_llamacpp_each": [0.5, 0.4, 0.6],
        "dpattn_rank_peak_rss_mb": [1500.0],
        "llamacpp_peak_rss_mb": 600.0,
    }
    report = {"gguf": "/c/m.gguf", "dtype": "float32", "layout": {"tp": 1, "dp": 1}}
    table = bl.format_table({**report, "threads": 2, "vs_llamacpp": [row]})
    assert "m.gguf" in table and "0.50" in table and "1500MB" in table and "600MB" in table
    assert os.path.basename(lc.DRIVER) == "llamacpp_driver.py" and lc.DRIVER.is_file()
