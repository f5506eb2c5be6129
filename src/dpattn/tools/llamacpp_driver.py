"""llama.cpp's side of `dpattn bench --compare-llamacpp`, run as a file by the Python of the
cached llama-cpp-python virtualenv (dpattn.tools.bench_llamacpp): it imports neither dpattn
nor torch, only llama_cpp (its low-level ctypes API) and numpy.

    python llamacpp_driver.py MODEL.gguf --threads N

loads the GGUF once, then answers JSON lines on stdin, one JSON line each on stdout:

    {"op": "generate", "prompts": [[ids], ...], "new_tokens": 32}
        -> {"ok": true, "seconds": S, "output_ids": [[ids], ...], "peak_rss_mb": M}
    {"op": "info"} -> {"ok": true, "peak_rss_mb": M, ...}
    {"op": "quit"} -> {"ok": true}, then exits

Before the first request it writes {"ready": true, "version": ..., "system_info": ...,
"n_vocab": ..., "load_s": ..., "peak_rss_mb": ...} (or {"ready": false, "error": ...}).

`generate` is greedy batched decoding through llama.cpp's batch API: one sequence id per
prompt, one llama_decode for all the prompts' tokens (the prefill, logits of each prompt's
last token only), then one llama_decode per step carrying the B sequences' last tokens, the
argmax of each sequence's logits being its next token. new_tokens tokens take the prefill and
new_tokens - 1 decode steps (the last token is sampled, not fed back): the work an engine does
for max_new_tokens = new_tokens. `seconds` is the wall time of all of it, argmax included. A
context per batch size (n_seq_max = B, n_batch >= B * prompt length) is made on its first
request (freeing the previous one); each request starts from an empty KV cache.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import traceback
from typing import Any, TextIO

PAD = 256  # llama.cpp rounds context sizes to this


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


class Runner:
    def __init__(
        self, model_path: str, threads: int, kv_unified: bool = False, flash_attn: int = -1
    ) -> None:
        import llama_cpp as lc
        import numpy as np

        self.lc, self.np = lc, np
        self.threads, self.kv_unified, self.flash_attn = threads, kv_unified, flash_attn
        start = time.perf_counter()
        lc.llama_backend_init()
        params = lc.llama_model_default_params()
        self.model = lc.llama_model_load_from_file(model_path.encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {model_path}")
        self.n_vocab = int(lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model)))
        self.load_s = time.perf_counter() - start
        self.contexts: dict[tuple[int, int, int], Any] = {}
        self.batches: dict[int, Any] = {}

    def _context(self, batch: int, prompt_tokens: int, seq_tokens: int) -> Any:
        """A context for `batch` sequences of up to seq_tokens tokens each (made once)."""
        lc = self.lc
        n_batch = max(512, _round_up(prompt_tokens, PAD))
        # kv_unified False (the default): a KV stream per sequence, each at least PAD cells, so
        # a sequence's attention spans its own tokens only.
        per_seq = _round_up(seq_tokens, PAD) if not self.kv_unified else seq_tokens
        n_ctx = _round_up(batch * per_seq, PAD)
        key = (batch, n_ctx, n_batch)
        if key not in self.contexts:
            for old in self.contexts.values():  # one batch size at a time: one KV cache
                lc.llama_free(old)
            self.contexts.clear()
            p = lc.llama_context_default_params()
            p.n_ctx = n_ctx
            p.n_batch = p.n_ubatch = n_batch
            p.n_seq_max = batch
            p.n_threads = p.n_threads_batch = self.threads
            p.kv_unified = self.kv_unified
            p.flash_attn_type = self.flash_attn
            p.no_perf = True
            ctx = lc.llama_init_from_model(self.model, p)
            if not ctx:
                raise RuntimeError(f"llama.cpp could not make a context for batch {batch}")
            self.contexts[key] = ctx
        return self.contexts[key]

    def _batch(self, capacity: int) -> Any:
        if capacity not in self.batches:
            self.batches[capacity] = self.lc.llama_batch_init(capacity, 0, 1)
        return self.batches[capacity]

    def _argmax(self, ctx: Any, rows: list[int]) -> list[int]:
        lc, np = self.lc, self.np
        out = []
        for i in rows:
            ptr = lc.llama_get_logits_ith(ctx, i)
            if not ptr:
                raise RuntimeError(f"llama.cpp returned no logits for batch row {i}")
            out.append(int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax()))
        return out

    def generate(self, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
        lc = self.lc
        if not prompts or any(not p for p in prompts) or new_tokens < 1:
            raise ValueError("generate needs non-empty prompts and new_tokens >= 1")
        bad = [t for p in prompts for t in p if not 0 <= t < self.n_vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary ({self.n_vocab})")
        b = len(prompts)
        lens = [len(p) for p in prompts]
        total = sum(lens)
        ctx = self._context(b, total, max(lens) + new_tokens)
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        batch = self._batch(max(total, b))
        outputs: list[list[int]] = [[] for _ in prompts]
        start = time.perf_counter()
        k, last = 0, []
        for s, ids in enumerate(prompts):  # the prefill: every prompt in one llama_decode
            for i, t in enumerate(ids):
                batch.token[k], batch.pos[k] = t, i
                batch.n_seq_id[k], batch.seq_id[k][0] = 1, s
                batch.logits[k] = i == len(ids) - 1
                k += 1
            last.append(k - 1)
        batch.n_tokens = k
        self._decode(ctx, batch)
        step_tokens = self._argmax(ctx, last)
        for step in range(new_tokens - 1):
            for s, t in enumerate(step_tokens):
                outputs[s].append(t)
                batch.token[s], batch.pos[s] = t, lens[s] + step
                batch.n_seq_id[s], batch.seq_id[s][0] = 1, s
                batch.logits[s] = True
            batch.n_tokens = b
            self._decode(ctx, batch)
            step_tokens = self._argmax(ctx, list(range(b)))
        for s, t in enumerate(step_tokens):
            outputs[s].append(t)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "output_ids": outputs, "peak_rss_mb": peak_rss_mb()}

    def _decode(self, ctx: Any, batch: Any) -> None:
        rc = self.lc.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def info(self) -> dict[str, Any]:
        lc = self.lc
        return {
            "version": getattr(lc, "__version__", "unknown"),
            "system_info": lc.llama_print_system_info().decode(errors="replace").strip(),
            "n_vocab": self.n_vocab,
            "load_s": self.load_s,
            "threads": self.threads,
            "kv_unified": self.kv_unified,
            "flash_attn": self.flash_attn,
            "peak_rss_mb": peak_rss_mb(),
            "pid": os.getpid(),
        }


def serve(runner: Any, requests: TextIO, replies: TextIO) -> None:
    """Answer JSON lines until {"op": "quit"} or the end of the input (runner: a Runner, or
    anything with its generate and info)."""

    def reply(obj: dict[str, Any]) -> None:
        replies.write(json.dumps(obj) + "\n")
        replies.flush()

    for line in requests:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            op = req.get("op")
            if op == "generate":
                reply({"ok": True, **runner.generate(req["prompts"], int(req["new_tokens"]))})
            elif op == "info":
                reply({"ok": True, **runner.info()})
            elif op == "quit":
                reply({"ok": True})
                return
            else:
                reply({"ok": False, "error": f"unknown op {op!r}"})
        except Exception as e:  # noqa: BLE001 - the bench reports it, the driver keeps serving
            reply({"ok": False, "error": f"{type(e).__name__}: {e}"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--kv-unified", action="store_true")
    parser.add_argument("--flash-attn", type=int, default=-1, help="-1 auto, 0 off, 1 on")
    args = parser.parse_args(argv)
    # The replies go to the original stdout; fd 1 becomes stderr, so whatever the C library
    # prints cannot break the protocol.
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        runner = Runner(args.model, args.threads, args.kv_unified, args.flash_attn)
    except Exception as e:  # noqa: BLE001 - reported to the bench in the ready line
        traceback.print_exc()
        replies.write(json.dumps({"ready": False, "error": f"{type(e).__name__}: {e}"}) + "\n")
        replies.flush()
        return 1
    replies.write(json.dumps({"ready": True, **runner.info()}) + "\n")
    replies.flush()
    serve(runner, sys.stdin, replies)
    return 0


if __name__ == "__main__":
    sys.exit(main())
