"""The request side of the Engine: the request table (submit, listen, stream, result, abort,
generate), the reader thread that feeds it from the ranks' outputs, and the KV accounting those
outputs update. Engine (engine.py) owns the processes, sockets and lifecycle and inherits this;
the attributes below are the ones Engine.__init__ sets that this side reads."""

from __future__ import annotations

import queue
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import zmq

from dpattn.config import EngineConfig
from dpattn.disaggregation.frontend import disaggregation_dp_rank
from dpattn.distributed.parallel_state import Layout
from dpattn.entrypoints.request_state import Delta, RequestState, check_logprob_options
from dpattn.entrypoints.validation import RequestLimits
from dpattn.executor.sampling_params import SamplingParams
from dpattn.messages import (
    AbortReq,
    BatchOutput,
    BootstrapInfo,
    FlushCache,
    GenerateBatch,
    RankInput,
    StepStats,
    TokenizedGenerateReq,
    Wake,
)
from dpattn.runtime.launch import RankGroup
from dpattn.runtime.router import DpRouter


class EngineRequests:
    cfg: EngineConfig
    layout: Layout
    tokenizer: Any
    limits: RequestLimits | None
    router: DpRouter
    ranks: RankGroup
    failure: str | None
    kv_source: str
    kv_bytes_per_token: int
    weight_bytes: int
    rss_bytes: int
    kv_free: list[int]
    kv_total: list[int]
    kv_cached: list[int]
    kv_used_peak: int
    flushes: list[int]
    retractions: list[int]
    step_stats: deque[tuple[int, StepStats]]
    step_listeners: list[Callable[[int, StepStats, int], None]]
    _closed: bool
    _lock: threading.Lock
    _pending: dict[str, RequestState]
    _abandoned: set[str]
    _req_socks: list[zmq.Socket]
    _out_sock: zmq.Socket

    # ---- KV accounting ----
    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens the whole system's KV cache holds: the sum of the DP groups' pools (a rank
        holds its group's tokens, its share of their KV heads)."""
        return sum(self.kv_total)

    def kv_summary(self) -> str:
        """The KV cache's size, as the start-up log and `dpattn serve` print it."""
        per_rank = self.kv_total[0] if self.kv_total else 0
        bpt = self.kv_bytes_per_token
        return (
            f"KV cache: {bpt} bytes per token per rank, {per_rank} tokens per DP group "
            f"({bpt * per_rank / 2**20:.2f} MiB on each of its ranks), "
            f"{self.kv_capacity_tokens} tokens in the system ({self.layout.dp_size} DP "
            f"group{'s' if self.layout.dp_size > 1 else ''}; {self.kv_source}); "
            f"{self.memory_summary()}"
        )

    def memory_summary(self) -> str:
        """A rank's resident memory at start and what its weights and KV pool take of it."""
        mib = 2**20
        kv = self.kv_bytes_per_token * (self.kv_total[0] if self.kv_total else 0)
        rss = max(self.rss_bytes, 1)
        return (
            f"rank memory: {self.rss_bytes / mib:.0f} MiB resident, weights "
            f"{self.weight_bytes / mib:.0f} MiB ({self.cfg.runner.quantization}), KV pool "
            f"{kv / mib:.0f} MiB ({100 * kv / rss:.0f}%)"
        )

    def reset_kv_peak(self) -> None:
        """Start a new peak measurement (kv_used_peak) from the slots held now."""
        with self._lock:
            self.kv_used_peak = self.kv_used()

    def kv_used(self) -> int:
        """KV slots requests hold now (as last reported), summed over the DP groups; slots of
        the prefix cache that no request holds count as free."""
        return sum(t - f for t, f in zip(self.kv_total, self.kv_free))

    # ---- outputs ----
    def _read_outputs(self) -> None:
        while not self._closed:
            try:
                if not self._out_sock.poll(100):
                    continue
                msg: BatchOutput = self._out_sock.recv_pyobj()
            except zmq.ZMQError:
                return
            d, outputs, stats, kv_free = msg.dp_rank, msg.outputs, msg.stats, msg.kv_free
            with self._lock:
                self.kv_free[d] = kv_free
                self.kv_used_peak = max(self.kv_used_peak, self.kv_used())
                self.retractions[d] = stats.retractions
                self.flushes[d] += msg.flushed
                self.kv_cached[d] = msg.kv_cached
                self.step_stats.append((d, stats))
                for listener in self.step_listeners:
                    listener(d, stats, kv_free)
                for o in outputs:
                    p = self._pending.get(o.rid)
                    if p is None:
                        continue
                    delta = p.absorb(o)
                    for listener in p.listeners:
                        listener(delta)
                    if o.finish_reason is not None:
                        p.finish_reason, p.matched_stop = o.finish_reason, o.matched_stop
                        self.router.finished(p.dp_rank, p.prompt_tokens)
                        p.done.set()
                        if o.rid in self._abandoned:
                            self._abandoned.discard(o.rid)
                            del self._pending[o.rid]

    # ---- requests ----
    def submit(
        self,
        input_ids: list[int],
        params: SamplingParams,
        return_logprob: bool = False,
        dp_rank: int | None = None,
        logprob_start_len: int = -1,
        top_logprobs_num: int = 0,
        bootstrap: BootstrapInfo | None = None,
    ) -> str:
        """Queue one request; logprob_start_len >= 0 asks for prompt logprobs from that position,
        top_logprobs_num for that many alternatives per prompt and output token (SGLang's names;
        both need return_logprob). A disaggregated server needs `bootstrap` (the PD router's)."""
        args = (input_ids, params, return_logprob, dp_rank, logprob_start_len, top_logprobs_num)
        return self._submit([args], bootstrap)[0]

    def _submit(
        self,
        requests: list[tuple[list[int], SamplingParams, bool, int | None, int, int]],
        bootstrap: BootstrapInfo | None = None,
    ) -> list[str]:
        """Check every request (submit()'s arguments each), then queue them with one message
        per DP group: when one is refused, none of the others is registered or sent."""
        if self.failure:
            raise RuntimeError(self.failure)
        if self._closed:
            raise RuntimeError("engine is shut down")
        assert self.limits is not None
        for ids, p, want, dp_rank, _, _ in requests:
            self.limits.check(ids, p, want, dp_rank)  # never a bad id on a rank
        for ids, p, want, _, start, top in requests:
            check_logprob_options(len(ids), want, start, top, p.max_new_tokens)
        ranks = [disaggregation_dp_rank(self.cfg, bootstrap, r[3]) for r in requests]
        by_group: dict[int, list[TokenizedGenerateReq]] = {}
        rids = [
            self._queue(ids, p, want, dp_rank, start, top, bootstrap, by_group)
            for (ids, p, want, _, start, top), dp_rank in zip(requests, ranks)
        ]
        with self._lock:  # zmq sockets are not thread-safe
            for d, reqs in by_group.items():
                self._send(d, reqs[0] if len(reqs) == 1 else GenerateBatch(reqs))
            for other in range(self.layout.dp_size):  # cut idle groups' back-off short
                if other not in by_group:
                    self._send(other, Wake())
        return rids

    def _queue(
        self,
        input_ids: list[int],
        params: SamplingParams,
        return_logprob: bool,
        dp_rank: int | None,
        logprob_start_len: int,
        top_logprobs_num: int,
        bootstrap: BootstrapInfo | None,
        out: dict[int, list[TokenizedGenerateReq]],
    ) -> str:
        """Route one checked request and register its state; its message goes into out[d]."""
        rid = uuid.uuid4().hex
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        with self._lock:
            d = self.router.route(input_ids, dp_rank)
            self._pending[rid] = RequestState(
                len(input_ids),
                d,
                input_ids=list(input_ids),
                logprob_start_len=logprob_start_len,
                skip_special_tokens=params.skip_special_tokens,
            )
            req = TokenizedGenerateReq(
                rid,
                list(input_ids),
                params,
                seed,
                return_logprob,
                logprob_start_len,
                top_logprobs_num,
                bootstrap,
            )
            out.setdefault(d, []).append(req)
        return rid

    def _send(self, d: int, msg: RankInput) -> None:
        try:
            self._req_socks[d].send_pyobj(msg)
        except zmq.Again:
            dead = self.ranks.dead_rank() or "no answer"
            raise RuntimeError(f"DP group {d} does not take requests: {dead}") from None

    def listen(self, rid: str, listener: Callable[[Delta], None]) -> None:
        """Call listener (from the engine's reader thread) with every delta of rid."""
        with self._lock:
            p = self._pending[rid]
            if p.output_ids or p.finish_reason:  # catch up on what already arrived
                listener(p.so_far(rid))
            if not p.done.is_set():
                p.listeners.append(listener)

    def stream(self, rid: str, timeout: float | None = None) -> Iterator[Delta]:
        """Deltas of rid as they arrive, ending with the one that has finish_reason."""
        q: queue.Queue[Delta] = queue.Queue()
        self.listen(rid, q.put)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                delta = q.get(timeout=0.2)
            except queue.Empty:
                self._check_alive(rid, deadline, timeout)
                continue
            if deadline is not None and delta.finish_reason is None:
                self._check_alive(rid, deadline, timeout)  # tokens keep coming: check anyway
            if delta.finish_reason == "error":
                raise RuntimeError(self.failure or "engine failed")
            yield delta
            if delta.finish_reason is not None:
                return

    def _check_alive(self, rid: str, deadline: float | None, timeout: float | None) -> None:
        if self.failure:
            raise RuntimeError(self.failure)
        if deadline is not None and time.monotonic() > deadline:
            self._abandon(rid)
            raise TimeoutError(f"request {rid} did not finish in {timeout}s: aborted")

    def _abandon(self, rid: str) -> None:
        """A timed-out request: abort it (its KV is freed) and forget it once it ended."""
        with self._lock:
            p = self._pending.get(rid)
            if p is None:
                return
            if p.done.is_set():
                del self._pending[rid]
                return
            self._abandoned.add(rid)
            self._send(p.dp_rank, AbortReq(rid))

    def abort(self, rid: str) -> None:
        with self._lock:
            p = self._pending.get(rid)
            if p is not None and not p.done.is_set():
                self._send(p.dp_rank, AbortReq(rid))

    def flush_cache(self, timeout_s: float = 30.0) -> None:
        """Every DP group drops the cached prefixes no request holds; returns once all did."""
        with self._lock:
            target = [n + 1 for n in self.flushes]
            for d in range(self.layout.dp_size):
                self._send(d, FlushCache())
        deadline = time.monotonic() + timeout_s
        while any(n < t for n, t in zip(self.flushes, target)):
            if self.failure:
                raise RuntimeError(self.failure)
            if time.monotonic() > deadline:
                raise TimeoutError(f"flush_cache: no answer in {timeout_s}s")
            time.sleep(0.005)

    def release(self, rid: str) -> None:
        """Forget a finished request consumed through listen() (result() does this itself)."""
        with self._lock:
            p = self._pending.get(rid)
            if p is not None and p.done.is_set():
                del self._pending[rid]

    def dp_rank_of(self, rid: str) -> int:
        """The DP group a submitted request was routed to."""
        with self._lock:
            return self._pending[rid].dp_rank

    def result(self, rid: str, timeout: float | None = None) -> dict[str, Any]:
        p = self._pending[rid]
        deadline = None if timeout is None else time.monotonic() + timeout
        while not p.done.wait(0.2):
            self._check_alive(rid, deadline, timeout)
        with self._lock:
            del self._pending[rid]
        if p.finish_reason == "error":
            raise RuntimeError(self.failure or "engine failed")
        text = (
            self.tokenizer.decode(p.output_ids, skip_special_tokens=p.skip_special_tokens)
            if self.tokenizer
            else ""
        )
        if isinstance(p.matched_stop, str) and p.matched_stop in text:
            text = text[: text.index(p.matched_stop)]
        meta = p.meta_info(rid)
        return {"text": text, "output_ids": p.output_ids, "meta_info": meta}

    def generate(
        self,
        prompt: str | list[str] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None,
        return_logprob: bool = False,
        dp_rank: int | list[int] | None = None,
        logprob_start_len: int = -1,
        top_logprobs_num: int = 0,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        if (prompt is None) == (input_ids is None):
            raise ValueError("give exactly one of prompt or input_ids")
        if input_ids is not None and not isinstance(input_ids, list):
            raise ValueError("input_ids must be a list of token ids or a list of such lists")
        single = isinstance(prompt, str) or (
            input_ids is not None and input_ids and isinstance(input_ids[0], int)
        )
        if prompt is not None:
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass input_ids")
            prompts = [prompt] if isinstance(prompt, str) else prompt
            if not isinstance(prompts, list) or not all(isinstance(x, str) for x in prompts):
                raise ValueError("prompt must be a string or a list of strings")
            batch_ids = [self.tokenizer.encode(p) for p in prompts]
        else:
            batch_ids = [input_ids] if single else list(input_ids)  # type: ignore[list-item]
        n = len(batch_ids)
        if n == 0:
            raise ValueError("the batch is empty")
        sp = sampling_params if isinstance(sampling_params, list) else [sampling_params] * n
        ranks = dp_rank if isinstance(dp_rank, list) else [dp_rank] * n
        if len(sp) != n or len(ranks) != n:
            raise ValueError(f"sampling_params and dp_rank lists must have {n} entries (the batch)")
        params = [SamplingParams.from_dict(s) for s in sp]  # all parsed before any is sent
        rids = self._submit(
            [
                (ids, p, return_logprob, r, logprob_start_len, top_logprobs_num)
                for ids, p, r in zip(batch_ids, params, ranks)
            ]
        )
        outs = [self.result(rid) for rid in rids]
        return outs[0] if single else outs

    def kv_pools_full(self) -> bool:
        """Every DP group's KV pool is back to its initial free size (as last reported)."""
        with self._lock:
            return self.kv_free == self.kv_total
