"""The bridge between the Engine's reader thread and the server's event loop.

`Submission` is the set of engine requests behind one HTTP request: the engine calls back on its
reader thread and deltas cross to the event loop with `loop.call_soon_threadsafe`, onto one
asyncio queue. `ServerState` holds admission control (429 beyond the schedulers' running capacity
plus `max_queued_requests`) and the request checks that need the engine (context, vocab, DP rank).
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from dpattn.disaggregation.frontend import BootstrapFields, per_sequence
from dpattn.disaggregation.metrics import DisaggMetrics
from dpattn.entrypoints.detokenizer import IncrementalDetokenizer
from dpattn.entrypoints.engine import Delta, Engine
from dpattn.entrypoints.metrics import ServerMetrics
from dpattn.entrypoints.openai_protocol import ApiError, bad
from dpattn.entrypoints.structured import grammar_error_param

DRAIN_TIMEOUT_S = 120.0  # an aborted request's last delta must arrive by then


class ServerState:
    def __init__(
        self,
        engine: Engine,
        model_name: str | None = None,
        max_queued_requests: int | None = 256,
        request_timeout_s: float | None = None,
    ) -> None:
        self.engine = engine
        self.request_timeout_s = request_timeout_s  # then aborted and answered 504
        self.tokenizer = engine.tokenizer
        self.model_name = model_name or os.path.basename(os.path.normpath(engine.cfg.model_path))
        self.dp_size = engine.layout.dp_size
        self.context_length = engine.context_length
        # The model's embedding rows (what the ranks index), not the tokenizer's length.
        self.vocab_size = engine.limits.vocab_size if engine.limits is not None else None
        self.metrics = ServerMetrics(self.dp_size, engine.layout.pp_size)
        engine.step_listeners.append(self.metrics.on_step)
        if engine.cfg.disaggregation_mode != "null":
            engine.step_listeners.append(DisaggMetrics(self.metrics.registry).on_step)
        per_group = engine.cfg.scheduler.max_running_requests
        capacity = self.dp_size * per_group
        self.max_in_flight = None if max_queued_requests is None else capacity + max_queued_requests
        self.in_flight = 0  # engine requests accepted and not finished (event loop only)
        self.drains: set[asyncio.Task[None]] = set()

    def reserve(self, k: int) -> None:
        if self.max_in_flight is not None and self.in_flight + k > self.max_in_flight:
            self.metrics.rejected.labels("queue_full").inc()
            raise ApiError(
                429,
                f"the server is at capacity ({self.in_flight} requests in flight, limit "
                f"{self.max_in_flight}); retry later",
                code="queue_full",
                type_="rate_limit_error",
            )
        self.in_flight += k
        self.metrics.inflight.set(self.in_flight)

    def unreserve(self, k: int) -> None:
        self.in_flight -= k
        self.metrics.inflight.set(self.in_flight)

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in (self.model_name, self.engine.cfg.model_path):
            raise ApiError(404, f"The model '{model}' does not exist", "model", "model_not_found")

    def dp_rank(self, header: str | None, body: int | None) -> int | None:
        rank = body
        if header is not None:
            try:
                rank = int(header)
            except ValueError:
                raise bad(
                    "X-Data-Parallel-Rank must be an integer", "X-Data-Parallel-Rank"
                ) from None
            if body is not None and body != rank:
                raise bad("X-Data-Parallel-Rank and dp_rank disagree", "dp_rank")
        if rank is not None and not 0 <= rank < self.dp_size:
            raise bad(f"dp_rank must be in [0, {self.dp_size})", "dp_rank")
        return rank

    def check_ids(self, ids: list[int], param: str) -> None:
        if not ids:
            raise bad(f"'{param}' must not be empty", param)
        bad_ids = [t for t in ids if not 0 <= t < (self.vocab_size or 0)]
        if self.vocab_size is not None and bad_ids:
            raise bad(
                f"'{param}' has {len(bad_ids)} token id(s) outside the model's vocabulary "
                f"[0, {self.vocab_size}), e.g. {bad_ids[0]}",
                param,
            )

    def check_length(self, n_prompt: int, max_new: int, param: str) -> None:
        ctx = self.context_length
        if n_prompt >= ctx or n_prompt + max_new > ctx:
            raise ApiError(
                400,
                f"This model's maximum context length is {ctx} tokens; the request has "
                f"{n_prompt} prompt tokens and asks for {max_new} more",
                param if n_prompt >= ctx else "max_tokens",
                "context_length_exceeded",
            )


class Choice:
    """One engine request of an HTTP request (one `choices[i]`)."""

    def __init__(
        self, index: int, rid: str, dp_rank: int, prompt_tokens: int, detok: Any, t0: float
    ) -> None:
        self.index, self.rid, self.dp_rank, self.prompt_tokens = index, rid, dp_rank, prompt_tokens
        self.detok = detok
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[float, int]]] = []
        self.input_logprobs: list[float] = []  # prompt logprobs (echo, logprob_start_len)
        self.input_top_logprobs: list[list[tuple[float, int]]] = []
        self.cached_tokens = 0  # of the prompt, served from the DP group's prefix cache
        self.text = ""
        self.text_offset = 0  # of the next token (completions logprobs)
        self.echoed = False  # completions echo: the prompt went out in front of the first chunk
        self.finish_reason: str | None = None
        self.matched_stop: str | int | None = None
        self.error = ""  # why the engine aborted it, when it says
        self.error_status = 0  # the HTTP status an abort answers (400: its grammar), 0: 503
        self.t_start = t0  # when the HTTP request was accepted
        self.t_last: float | None = None


class Submission:
    """The engine requests behind one HTTP request; their deltas arrive on one asyncio queue."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[Choice, Delta, float]] = asyncio.Queue()
        self.choices: list[Choice] = []
        self.untrimmed: set[int] = set()  # items whose text keeps the stop string (no_stop_trim)
        # item -> the request parameter its grammar came from (a grammar error's 400 names it)
        self.grammar_params: dict[int, str] = {}
        self.closed = False
        self.t0 = time.perf_counter()
        timeout = state.request_timeout_s
        self.deadline = None if timeout is None else time.monotonic() + timeout

    async def start(
        self,
        items: list[tuple[list[int], Any, int | None]],
        logprob: bool,
        top_logprobs_num: int = 0,
        logprob_start_len: int = -1,
        bootstrap: BootstrapFields | None = None,
    ) -> None:
        """Submit (input_ids, SamplingParams, dp_rank) items, all or none (429 if full);
        disaggregated: each item's bootstrap room comes from the body's fields, derived alike
        on both servers (frontend.BootstrapFields)."""
        st = self.state
        st.reserve(len(items))
        try:
            boots = per_sequence(st.engine.cfg, bootstrap, len(items))
            for i, (ids, params, dp_rank) in enumerate(items):
                if dp_rank is None and i and ids == items[i - 1][0]:
                    # n > 1: the choices of one prompt share a DP group, where the prompt is
                    # prefilled once and its cached prefix serves the others
                    dp_rank = self.choices[-1].dp_rank
                submit = functools.partial(
                    st.engine.submit,
                    ids,
                    params,
                    logprob,
                    dp_rank,
                    logprob_start_len=logprob_start_len,
                    top_logprobs_num=top_logprobs_num,
                    bootstrap=boots[i],
                )
                rid = await self.loop.run_in_executor(None, submit)
                stops = [] if i in self.untrimmed else params.stop  # no_stop_trim: none cut
                choice = Choice(
                    i,
                    rid,
                    st.engine.dp_rank_of(rid),
                    len(ids),
                    IncrementalDetokenizer(st.tokenizer, stops, params.skip_special_tokens),
                    self.t0,
                )
                self.choices.append(choice)
                st.metrics.prompt_tokens.labels(*st.metrics.labels(choice.dp_rank)).inc(len(ids))
                st.engine.listen(rid, functools.partial(self._on_delta, choice))
        except BaseException as e:
            st.unreserve(len(items) - len(self.choices))
            self.close()
            if isinstance(e, ValueError):  # the item that failed: the next one to be a choice
                param = grammar_error_param(e, self.grammar_params.get(len(self.choices)))
                raise bad(str(e), param) from None
            if isinstance(e, RuntimeError):
                raise ApiError(503, str(e), code="engine_unavailable") from None
            raise

    def _on_delta(self, choice: Choice, delta: Delta) -> None:  # engine reader thread
        try:
            self.loop.call_soon_threadsafe(
                self.queue.put_nowait, (choice, delta, time.perf_counter())
            )
        except RuntimeError:  # the event loop is gone: the server is shutting down
            pass

    @property
    def live(self) -> list[Choice]:
        return [c for c in self.choices if c.finish_reason is None]

    async def events(self) -> AsyncIterator[tuple[Choice, str, Delta]]:
        """(choice, newly released text, delta) until every choice has finished."""
        while self.live:
            if self.deadline is None or self.closed:  # a drain waits without the deadline
                choice, delta, t = await self.queue.get()
            else:
                try:
                    left = self.deadline - time.monotonic()
                    choice, delta, t = await asyncio.wait_for(self.queue.get(), max(left, 0))
                except asyncio.TimeoutError:
                    self.close()  # aborts what still runs; its KV is freed
                    timeout = self.state.request_timeout_s
                    raise ApiError(
                        504,
                        f"the request did not finish within the server's request timeout "
                        f"({timeout} s) and was aborted",
                        code="request_timeout",
                    ) from None
            yield choice, self._absorb(choice, delta, t), delta

    def _absorb(self, c: Choice, delta: Delta, t: float) -> str:
        st, lbl = self.state, self.state.metrics.labels(c.dp_rank)
        m = st.metrics
        if delta.new_ids:
            if c.t_last is None:
                m.ttft.labels(*lbl).observe(t - c.t_start)
            else:
                m.itl.labels(*lbl).observe((t - c.t_last) / len(delta.new_ids))
            c.t_last = t
            m.generation_tokens.labels(*lbl).inc(len(delta.new_ids))
            c.ids += delta.new_ids
            c.logprobs += delta.new_logprobs
        c.top_logprobs += delta.new_top_logprobs
        c.input_logprobs += delta.input_logprobs
        c.input_top_logprobs += delta.input_top_logprobs
        if delta.cached_tokens:
            c.cached_tokens += delta.cached_tokens
            m.cached_tokens.labels(*lbl).inc(delta.cached_tokens)
        text = c.detok.add(list(delta.new_ids))
        if delta.finish_reason is not None:
            c.finish_reason, c.matched_stop = delta.finish_reason, delta.matched_stop
            c.error, c.error_status = delta.error, delta.error_status
            text += c.detok.finish(delta.matched_stop)
            st.unreserve(1)
            st.engine.release(c.rid)
            m.finished.labels(*lbl, delta.finish_reason).inc()
            m.e2e.labels(*lbl).observe(t - c.t_start)
        c.text += text
        return text

    def close(self) -> None:
        """Abort what still runs (client gone, error); a task consumes their last deltas."""
        if self.closed:
            return
        self.closed = True
        live = self.live
        if not live:
            return
        for c in live:
            try:
                self.state.engine.abort(c.rid)
            except RuntimeError:
                pass  # the engine failed: its watchdog finishes every request with "error"
        task = self.loop.create_task(self._drain())
        self.state.drains.add(task)
        task.add_done_callback(self.state.drains.discard)

    async def _drain(self) -> None:
        async def consume() -> None:
            async for _ in self.events():
                pass

        try:
            await asyncio.wait_for(consume(), DRAIN_TIMEOUT_S)
        except asyncio.TimeoutError:
            self.state.unreserve(len(self.live))

    async def collect(self, receive: Any) -> bool:
        """Wait for every choice (non-streaming); False if the client went away first."""

        async def consume() -> None:
            async for _ in self.events():
                pass

        async def disconnected() -> None:
            try:
                while (await receive())["type"] != "http.disconnect":
                    pass
            except Exception:  # noqa: BLE001 - a broken connection is a gone client too
                return

        work, gone = asyncio.ensure_future(consume()), asyncio.ensure_future(disconnected())
        finished = False
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            finished = work.done()
        finally:
            gone.cancel()
            if not finished:
                work.cancel()
                self.close()
        if not finished:
            return False
        work.result()  # re-raise what consuming raised
        return True

    def failure(self) -> ApiError | None:
        """The error to answer if a choice ended by the engine's failure (503) or an abort: 400
        where the rank said the request was at fault (its grammar), else 503."""
        failed = [c for c in self.choices if c.finish_reason in ("error", "abort")]
        failed.sort(key=lambda c: (c.finish_reason != "error", not c.error_status))
        if not failed:
            return None
        c = failed[0]
        if c.finish_reason == "error":
            return ApiError(503, self.state.engine.failure or "engine failed", code="engine_failed")
        if c.error_status:
            why = c.error or "the request is invalid"
            param = self.grammar_params.get(c.index)
            return ApiError(c.error_status, f"the request failed: {why}", param, "invalid_value")
        why = c.error or "it cannot fit the KV cache"
        return ApiError(503, f"the engine aborted the request ({why})", code="request_aborted")
