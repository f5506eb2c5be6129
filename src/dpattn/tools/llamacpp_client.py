"""llama-cpp-python for `dpattn bench --compare-llamacpp`: built once into the cache, and the
client of its driver process (llamacpp_driver.py, fed JSON lines).

llama-cpp-python is no dependency of dpattn: the first run builds it from source (about 5 min
on 2 cores) into a virtualenv of its own in the cache, `$DPATTN_CACHE/llamacpp-VERSION`, under
a lock and with a marker file written last (a concurrent run waits, an interrupted one is
redone). It is built from source, not taken as a wheel, so that ggml is compiled for this CPU
(GGML_NATIVE: AVX-512, VNNI, BF16, AMX where there): llama.cpp at its fastest here. GCC before
14 declares the AMX tile-config load (`_tile_loadconfig`) as reading 8 bytes, not 64, so it
drops ggml's stores of the tile shapes and `ldtilecfg` faults on garbage (a SIGSEGV in
llama_decode on AMX CPUs): the build then gets a copy of that header that declares all 64.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dpattn.models.gguf_convert import cache_root

LLAMACPP_VERSION = "0.3.36"
DRIVER = Path(__file__).with_name("llamacpp_driver.py")
MARKER = ".dpattn-installed"
INSTALL_TIMEOUT_S = 3 * 3600
# GCC's buggy operand (8 bytes) and the fix (the whole 64-byte tile config).
_TILECFG_BUG = (
    ('"m" (*((const void **)__config))', '"m" (*((const char (*)[64])__config))'),
    ('"=m" (*((void **)__config))', '"=m" (*((char (*)[64])__config))'),
)


def _log(msg: str) -> None:
    print(f"dpattn: {msg}", file=sys.stderr, flush=True)


def venv_dir() -> Path:
    return cache_root() / f"llamacpp-{LLAMACPP_VERSION}"


def tilecfg_header_fix(dest: Path, compiler: str | None = None) -> Path | None:
    """A fixed copy of GCC's amxtileintrin.h in dest, if the compiler's has the 8-byte operand
    (GCC < 14); None where nothing needs fixing (clang, a fixed GCC, not x86)."""
    compiler = compiler or os.environ.get("CXX") or "c++"
    try:
        done = subprocess.run(
            [compiler, "-print-file-name=include"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    header = Path(done.stdout.strip()) / "amxtileintrin.h"
    if done.returncode != 0 or not header.is_file():
        return None
    text = header.read_text()
    if not any(bug in text for bug, _ in _TILECFG_BUG):
        return None
    for bug, fix in _TILECFG_BUG:
        text = text.replace(bug, fix)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "amxtileintrin.h").write_text(text)
    return dest


def build_cmake_args(header_fix: Path | None) -> list[str]:
    """The CMake arguments of the llama-cpp-python build: ggml for this CPU, no multimodal
    library (the bench does not use it), GCC's tile-config header fixed where needed."""
    args = ["-DGGML_NATIVE=ON", "-DLLAVA_BUILD=OFF"]
    if header_fix is not None:
        if re.search(r"\s", str(header_fix)):
            raise RuntimeError(f"the header fix's folder has white space: {header_fix}")
        args += [f"-DCMAKE_C_FLAGS=-isystem{header_fix}", f"-DCMAKE_CXX_FLAGS=-isystem{header_fix}"]
    return args


def install_command(python: Path, cmake_args: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """pip's command line and environment: llama-cpp-python built from its source (no wheel,
    none from pip's cache either: a wheel built elsewhere may not suit this CPU)."""
    cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--no-cache-dir"]
    cmd += ["--no-binary", "llama-cpp-python", f"llama-cpp-python=={LLAMACPP_VERSION}"]
    env = {
        **os.environ,
        "CMAKE_ARGS": " ".join(cmake_args),
        "FORCE_CMAKE": "1",
        "CMAKE_BUILD_PARALLEL_LEVEL": str(_cpus()),
    }
    return cmd, env


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def llamacpp_python(gguf: Path, progress: bool = True) -> Path:
    """The Python of a virtualenv holding llama-cpp-python LLAMACPP_VERSION, built once (and
    checked: it must generate a token from gguf) and reused."""
    venv = venv_dir()
    python = venv / "bin" / "python"
    marker = venv / MARKER
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".llamacpp-{LLAMACPP_VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one installer at a time; the others wait, then reuse
        if marker.exists() and python.exists():
            return python
        shutil.rmtree(venv, ignore_errors=True)  # a half-made or unchecked one: made again
        log_path = venv.parent / f"llamacpp-{LLAMACPP_VERSION}-install.log"
        start = time.monotonic()
        if progress:
            _log(
                f"first run: building llama-cpp-python {LLAMACPP_VERSION} from source into "
                f"{venv} (once; about 5 min on 2 cores; log: {log_path})"
            )
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        with tempfile.TemporaryDirectory(prefix="dpattn-tilecfg-") as fix_dir:
            cmake_args = build_cmake_args(tilecfg_header_fix(Path(fix_dir)))
            cmd, env = install_command(python, cmake_args)
            with open(log_path, "w") as log:
                log.write(f"CMAKE_ARGS={env['CMAKE_ARGS']}\n{' '.join(cmd)}\n")
                log.flush()
                done = subprocess.run(
                    cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=INSTALL_TIMEOUT_S
                )
        if done.returncode != 0:
            raise RuntimeError(
                f"building llama-cpp-python {LLAMACPP_VERSION} failed (exit {done.returncode}); "
                f"its log: {log_path}\n{_tail(log_path)}"
            )
        install_s = time.monotonic() - start
        # A build that crashes gets no marker. Two prompts: ggml's AMX kernels (the tile config)
        # run for a matrix product of more than one row.
        try:
            with LlamaCppDriver(python, gguf, threads=min(2, _cpus())) as driver:
                driver.generate([[2, 818, 5279, 529, 7001, 563, 496, 3207]] * 2, 2)
                system_info = driver.info.get("system_info", "")
        except DriverError as e:
            raise RuntimeError(
                f"llama-cpp-python {LLAMACPP_VERSION} was built (CMAKE_ARGS "
                f"{' '.join(cmake_args)}) but cannot run the model: {e}\nbuild log: {log_path}"
            ) from None
        build = {
            "version": LLAMACPP_VERSION,
            "cmake_args": cmake_args,
            "install_s": round(install_s),
            "system_info": system_info,
        }
        marker.write_text(json.dumps(build, indent=2) + "\n")
        if progress:
            _log(f"llama-cpp-python built and checked in {install_s / 60:.0f} min")
    return python


def build_info() -> dict[str, Any]:
    """What the marker recorded of the build (cmake args, install time), if readable."""
    try:
        return dict(json.loads((venv_dir() / MARKER).read_text()))
    except (OSError, ValueError):
        return {}


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ---------------------------------------------------------------- the llama.cpp process


class DriverError(RuntimeError):
    """The llama.cpp driver failed a request, or died."""


class LlamaCppDriver:
    """llamacpp_driver.py in a subprocess (the venv's Python): JSON lines in and out. `command`
    replaces the whole command line (tests run a fake driver)."""

    def __init__(
        self,
        python: Path | str,
        gguf: Path | str,
        threads: int,
        command: list[str] | None = None,
        timeout_s: float = 600,
    ) -> None:
        self.timeout_s = timeout_s
        cmd = command or [str(python), str(DRIVER), str(gguf), "--threads", str(threads)]
        self._log = tempfile.NamedTemporaryFile(  # closed in close()
            "w+", prefix="dpattn-llamacpp-", suffix=".log"
        )
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            start_new_session=True,  # Ctrl-C goes to the bench, which stops the driver
        )
        try:
            self.info = self._read()
            if not self.info.get("ready"):
                raise DriverError(f"llama.cpp did not start: {self.info.get('error')}")
        except BaseException:
            self.close()
            raise

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout_s)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            if ready:  # end of file: it died
                self.proc.wait(timeout=30)
            raise DriverError(self._why_no_answer())
        return dict(json.loads(line))

    def _why_no_answer(self) -> str:
        rc = self.proc.poll()
        if rc is None:
            what = f"did not answer in {self.timeout_s:.0f} s"
        elif rc < 0:
            what = f"died of {signal.Signals(-rc).name}"
        else:
            what = f"exited {rc}"
        self._log.flush()
        self._log.seek(0)
        tail = "\n".join(self._log.read().splitlines()[-12:])
        return f"the llama.cpp driver {what}" + (f"; its stderr ends:\n{tail}" if tail else "")

    def request(self, **req: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise DriverError(self._why_no_answer()) from None
        reply = self._read()
        if not reply.get("ok"):
            raise DriverError(f"llama.cpp driver: {reply.get('error')}")
        return reply

    def generate(self, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
        """{"seconds", "output_ids", "peak_rss_mb"}: greedy, new_tokens tokens per prompt."""
        return self.request(op="generate", prompts=prompts, new_tokens=new_tokens)

    def peak_rss_mb(self) -> float:
        return float(self.request(op="info")["peak_rss_mb"])

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError, ValueError):
                if stream is not None:
                    stream.close()
        self._log.close()

    def __enter__(self) -> LlamaCppDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- the comparison
