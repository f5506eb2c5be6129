"""Constrained decoding: grammars compiled off the scheduler's path, one matcher per request,
one token bitmask per step over the rows that carry a grammar.

``GrammarBackend`` is the interface the scheduler uses; ``XGrammarBackend`` implements it with
xgrammar (its Earley matcher precomputes per-state token masks, so filling 64 rows of Gemma's
262,144-token vocabulary takes ~0.5 ms; applying the mask to the logits is the step's real
cost). Every rank of a DP group builds the same matchers from the same grammar and feeds them
the same sampled tokens, so their masks, and hence their tokens, agree without communication.
"""

from __future__ import annotations

import functools
import json
import queue
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from enum import IntEnum
from typing import Any, Protocol

import numpy as np
import torch

from dpattn.executor.sampling_params import SamplingParams

GrammarKey = tuple[str, str]  # (kind, text): json_schema / regex / ebnf, as SamplingParams has it
CACHE_SIZE = 256  # compiled grammars kept (a server sees the same few schemas again and again)
MAX_COMPILE_THREADS = 8


class GrammarStatus(IntEnum):
    # Ordered so that the minimum over a DP group's ranks is the status they agree on: one
    # rank's failure (or timeout) fails the request everywhere; it is ready when all are.
    FAILED = 0
    PENDING = 1
    READY = 2


class Matcher(Protocol):
    def accept_token(self, token_id: int) -> bool: ...
    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int = 0) -> Any: ...
    def is_terminated(self) -> bool: ...


class GrammarBackend(Protocol):
    def submit(self, key: GrammarKey) -> None:
        """Start compiling (no-op if compiled, compiling or failed before)."""

    def status(self, key: GrammarKey, waited_s: float) -> tuple[GrammarStatus, str]:
        """Where the compile stands after a request waited ``waited_s`` for it; the string
        says why it failed."""

    def matcher(self, key: GrammarKey) -> Matcher:
        """A fresh matcher at the grammar's start (the key's status is READY)."""

    def allocate_bitmask(self, rows: int) -> torch.Tensor: ...

    def close(self) -> None: ...


def check_grammar(params: SamplingParams) -> None:
    """The frontend's check: the grammar parses (no tokenizer needed, so it is cheap); a
    ValueError names the field. Compiling against the vocabulary happens on the ranks."""
    if params.grammar is None:
        return
    import xgrammar as xgr

    kind, text = params.grammar
    try:
        if kind == "json_schema":
            json.loads(text)
            json_schema_grammar(text)
        elif kind == "regex":
            xgr.Grammar.from_regex(text)
        else:
            xgr.Grammar.from_ebnf(text)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ValueError(f"{kind}: {_reason(e)}") from None


# xgrammar 0.2.9 writes a string with minLength / maxLength as a repetition of the first class,
# which lets raw control characters through: invalid JSON that a strict parser refuses (its
# issue 800); its unbounded strings use the second. Both admit UTF-8-encoded surrogates
# (U+D800-DFFF), which a decoder turns into three U+FFFD: one character to the grammar, three
# in the text, past a maxLength. Every string character takes the class without either.
_STRING_CHARS = (r"[^\"\\\r\n]", r"[^\0-\x1f\"\\\r\n]")
_JSON_STRING_CHAR = r"[^\0-\x1f\"\\\r\n\uD800-\uDFFF]"
_ESCAPE = re.compile(r"\\(\\|x[0-9A-Fa-f]{2}|.)")  # one escape of xgrammar's EBNF printer


def json_schema_grammar(text: str) -> Any:
    """The xgrammar Grammar of a JSON schema: compact JSON (a model may not fill the output
    with whitespace until max_tokens), strings of JSON's characters only."""
    import xgrammar as xgr

    ebnf = str(xgr.Grammar.from_json_schema(text, any_whitespace=False))
    for loose in _STRING_CHARS:
        ebnf = ebnf.replace(loose, _JSON_STRING_CHAR)
    # The printer writes U+0080-00FF as \xHH, which its parser reads greedily: "\x80" then a
    # literal "0" would come back as U+0800. \u takes exactly four digits.
    return xgr.Grammar.from_ebnf(
        _ESCAPE.sub(lambda m: "\\u00" + m[1][1:] if m[1][0] == "x" else m[0], ebnf)
    )


def _reason(e: Exception) -> str:
    # xgrammar's messages start with "[time] /path/file.cc:line: "; keep what follows.
    msg = str(e).strip()
    return msg.split(": ", 1)[1].strip() if msg.startswith("[") and ": " in msg else msg


class _DaemonPool:
    """Compile threads that never hold up the process: a concurrent.futures pool joins its
    threads at exit, so one compile that never ends would keep a rank from exiting."""

    def __init__(self, threads: int) -> None:
        self._jobs: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = (
            queue.SimpleQueue()
        )
        self.threads = 0
        for _ in range(threads):
            self.grow()

    def grow(self) -> None:
        self.threads += 1
        threading.Thread(target=self._work, name="grammar-compile", daemon=True).start()

    def submit(self, fn: Callable[[], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        self._jobs.put((future, fn))
        return future

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as e:  # the request fails with it; the thread goes on
                    future.set_exception(e)

    def close(self) -> None:
        for _ in range(self.threads):
            self._jobs.put(None)


class XGrammarBackend:
    """Compiles on a few daemon threads, off the scheduler loop; keeps the last CACHE_SIZE
    grammars, failures included, so a repeated bad grammar fails fast.
    A compile past the timeout fails its requests, and any later request for the same grammar
    at once; its thread is replaced (up to MAX_COMPILE_THREADS) so other grammars still compile.
    """

    def __init__(
        self,
        tokenizer: Callable[[], Any],
        vocab_size: int,
        stop_token_ids: set[int],
        timeout_s: float,
        threads: int = 2,
    ) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._stop_ids = sorted(stop_token_ids)
        self.timeout_s = timeout_s
        self._pool = _DaemonPool(threads)
        self._stuck: set[GrammarKey] = set()  # compiles that ran past the timeout
        self._compiler: Any = None
        self._compiler_lock = threading.Lock()
        self._cache: OrderedDict[GrammarKey, Future[Any]] = OrderedDict()

    def _get_compiler(self) -> Any:
        # Built by the first compile, on a pool thread: the tokenizer info of a large vocabulary
        # takes ~1 s (Gemma 3) that the scheduler loop never waits for.
        with self._compiler_lock:
            if self._compiler is None:
                import xgrammar as xgr

                tok = self._tokenizer()
                if tok is None:  # the model directory has none
                    raise RuntimeError("the model has no tokenizer to compile grammars against")
                info = xgr.TokenizerInfo.from_huggingface(
                    tok, vocab_size=self._vocab_size, stop_token_ids=self._stop_ids
                )
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            return self._compiler

    def _compile(self, key: GrammarKey) -> Any:
        kind, text = key
        compiler = self._get_compiler()
        if kind == "json_schema":
            return compiler.compile_grammar(json_schema_grammar(text))
        if kind == "regex":
            return compiler.compile_regex(text)
        return compiler.compile_grammar(text)

    def submit(self, key: GrammarKey) -> None:
        if key in self._cache:
            self._cache.move_to_end(key)
            return
        self._cache[key] = self._pool.submit(functools.partial(self._compile, key))
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)

    def status(self, key: GrammarKey, waited_s: float) -> tuple[GrammarStatus, str]:
        future = self._cache.get(key)
        if future is None:  # evicted while the request waited: compile it again
            self.submit(key)
            return GrammarStatus.PENDING, ""
        if not future.done():
            if key not in self._stuck and waited_s <= self.timeout_s:
                return GrammarStatus.PENDING, ""
            if key not in self._stuck and self._pool.threads < MAX_COMPILE_THREADS:
                self._pool.grow()  # that thread may never come back
            self._stuck.add(key)
            return GrammarStatus.FAILED, f"grammar compile timed out after {self.timeout_s} s"
        self._stuck.discard(key)
        e = future.exception()
        if e is not None:
            return GrammarStatus.FAILED, f"{key[0]}: {_reason(e)}"
        return GrammarStatus.READY, ""

    def matcher(self, key: GrammarKey) -> Matcher:
        import xgrammar as xgr

        return xgr.GrammarMatcher(self._cache[key].result())

    def allocate_bitmask(self, rows: int) -> torch.Tensor:
        import xgrammar as xgr

        return xgr.allocate_token_bitmask(rows, self._vocab_size)

    def close(self) -> None:
        self._pool.close()


def fill_bitmask(bitmask: torch.Tensor, matchers: Sequence[Matcher | None]) -> list[int]:
    """Fill row i of ``bitmask`` from matchers[i]; returns the rows that carry a grammar."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    for i in rows:
        matchers[i].fill_next_token_bitmask(bitmask, i)  # type: ignore[union-attr]
    return rows


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Set the logits of the tokens each constrained row's grammar forbids to -inf, in place.

    Bit j of the bitmask's int32 word w allows token 32 w + j. On CPU the bits are unpacked by
    numpy (little-endian bytes: bit order = token order) and applied with one masked_fill over
    the constrained rows: 3x faster than xgrammar's CPU kernel on Gemma's vocabulary (64 rows:
    ~20 against 64 ms, measured). Columns past the bitmask's vocabulary stay as they are.
    """
    if not rows:
        return
    if logits.device.type != "cpu":
        import xgrammar as xgr

        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=rows)
        return
    b, v = logits.shape
    n = min(v, bitmask.shape[1] * 32)
    sel = rows if len(rows) < b else None
    bits = bitmask.numpy() if sel is None else bitmask.numpy()[sel]
    allowed = torch.from_numpy(np.unpackbits(bits.view(np.uint8), axis=-1, bitorder="little"))
    forbidden = allowed[:, :n].view(torch.bool).logical_not_()
    if sel is None:
        logits[:, :n].masked_fill_(forbidden, -torch.inf)
        return
    index = torch.tensor(sel, dtype=torch.long)
    part = logits.index_select(0, index)
    part[:, :n].masked_fill_(forbidden, -torch.inf)
    logits.index_copy_(0, index, part)


class MaskFill:
    """One step's bitmask, filled on a worker thread while the model computes (the matchers'
    states are final before the forward: they accepted the previous step's tokens)."""

    def __init__(
        self, pool: ThreadPoolExecutor, backend: GrammarBackend, matchers: list[Matcher | None]
    ) -> None:
        self.matchers = matchers
        self.bitmask = backend.allocate_bitmask(len(matchers))
        self._rows = pool.submit(fill_bitmask, self.bitmask, matchers)

    def apply(self, logits: torch.Tensor, rows: list[int]) -> dict[str, float]:
        """Mask ``logits``, whose row j is batch row rows[j]; returns the step stats (rows
        constrained, seconds spent waiting for the fill and applying the mask)."""
        t0 = time.perf_counter()
        self._rows.result()
        sub = [j for j, i in enumerate(rows) if self.matchers[i] is not None]
        bitmask = self.bitmask if len(rows) == len(self.matchers) else self.bitmask[rows]
        with torch.inference_mode():  # the logits are the forward's (inference) tensors
            apply_bitmask(logits, bitmask, sub)
        return dict(constrained=len(sub), grammar_s=time.perf_counter() - t0)


class NoGrammarBackend:
    """Every grammar fails (400), nothing is compiled: --grammar-backend none, or a model
    without a tokenizer to compile against."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def submit(self, key: GrammarKey) -> None:
        pass

    def status(self, key: GrammarKey, waited_s: float) -> tuple[GrammarStatus, str]:
        return GrammarStatus.FAILED, self.reason

    def matcher(self, key: GrammarKey) -> Matcher:
        raise AssertionError("no grammar is ever ready")

    def allocate_bitmask(self, rows: int) -> torch.Tensor:
        raise AssertionError("no grammar is ever ready")

    def close(self) -> None:
        pass


def make_backend(
    name: str,
    tokenizer: Callable[[], Any] | None,
    vocab_size: int,
    stop_token_ids: set[int],
    timeout_s: float,
) -> GrammarBackend:
    if name == "none":
        return NoGrammarBackend("constrained decoding is off (--grammar-backend none)")
    if tokenizer is None:
        return NoGrammarBackend("the model has no tokenizer to compile grammars against")
    if name == "xgrammar":
        return XGrammarBackend(tokenizer, vocab_size, stop_token_ids, timeout_s)
    raise ValueError(f"unknown grammar backend {name!r}")
