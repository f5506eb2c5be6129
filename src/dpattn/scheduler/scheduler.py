"""Per-rank scheduler: continuous batching (prefill first, chunked prefill, decode, retraction)
with the MLP sync every iteration. Transport-agnostic: messages in, outputs out."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from dpattn.config import SchedulerConfig
from dpattn.executor.forward_batch import ForwardMode
from dpattn.executor.grammar import MaskFill, make_backend
from dpattn.executor.logprobs import PromptLogprobs
from dpattn.executor.model_runner import ModelRunner
from dpattn.kvcache.prefix_cache import make_prefix_cache
from dpattn.messages import RequestOutput, StepStats
from dpattn.scheduler.batch_builder import BatchBuilder
from dpattn.scheduler.grammar_queue import GrammarQueue
from dpattn.scheduler.mlp_sync import SyncDecision, batch_to_run, prepare_mlp_sync_batch
from dpattn.scheduler.schedule_batch import (
    FinishReason,
    Req,
    ScheduleBatch,
    collect_prompt_logprobs,
    sample_requests,
    scored_output,
    token_output,
)
from dpattn.scheduler.step_result import SkippedResult, StepResult, forward_stats, sample_rows
from dpattn.scheduler.stop import StopRules


class Scheduler(BatchBuilder):
    # The rank loop's longest idle nap (ms); a disaggregated decode server lowers it (decode.py).
    max_idle_backoff_ms = 50

    def __init__(
        self,
        runner: ModelRunner,
        cfg: SchedulerConfig,
        eos_ids: set[int],
        tokenizer: Callable[[], Any] | None = None,
    ) -> None:
        if cfg.skip_all_gather and runner.ps.dp_size > 1:
            # The MLP layers need every DP group's token count at D > 1: with the all-gather
            # skipped no rank knows them, and the first forward would fail in the runner.
            raise ValueError(
                f"skip_all_gather=True needs dp_size == 1 (got dp_size={runner.ps.dp_size})"
            )
        self.runner = runner
        self.ps = runner.ps
        self.cfg = cfg
        self.eos_ids = eos_ids
        # Called the first time a request has stop strings or a grammar: a large vocabulary's
        # tokenizer costs a rank ~300 MB of memory (Gemma 3), which plain serving never pays.
        self.tokenizer = tokenizer
        self.stop_rules = StopRules(eos_ids, tokenizer)
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.chunked: Req | None = None  # a prompt being prefilled over several steps
        self.outputs: list[RequestOutput] = []
        self.last_stats = StepStats()
        self.num_retractions = 0  # running requests sent back to wait for lack of KV slots
        # Prompts whose last chunk ran but whose first token is not applied yet (pipeline
        # stages): they will decode, so they count against the running limit and KV slots.
        self.num_landing = 0
        self.cache = make_prefix_cache(
            runner.kv_pool, runner.req_to_token, cfg.disable_radix_cache, cfg.page_size
        )
        backend = make_backend(
            cfg.grammar_backend, tokenizer, runner.vocab_size, eos_ids, cfg.grammar_compile_timeout
        )
        self.grammars = GrammarQueue(backend, self.ps.attn_tp_cpu, self.ps.pp_group)

    # ---- requests in ----
    def add_request(self, req: Req) -> None:
        """A request with a grammar waits for it to compile on every rank of the group first."""
        if req.params.grammar is not None:
            self.grammars.add(req)
        else:
            self._admit(req)

    def _admit(self, req: Req) -> None:
        self.waiting.append(req)

    def _poll_grammars(self) -> None:
        ready, failed = self.grammars.poll()
        for req in ready:
            self._admit(req)
        for req, why in failed:
            self._fail_grammar(req, why)

    def _fail_grammar(self, req: Req, why: str) -> None:
        self._finish(req, FinishReason.ABORT, emit=False)
        self.outputs.append(
            RequestOutput(
                req.rid,
                [],
                [],
                "abort",
                prompt_tokens=len(req.input_ids),
                error=why,
                error_status=400,
            )
        )

    def abort_request(self, rid: str) -> None:
        for req in self.grammars.remove(rid):
            self._finish(req, FinishReason.ABORT)
        for req in [*self.waiting, *self.running, *([self.chunked] if self.chunked else [])]:
            if req.rid == rid and not req.finished:
                self._finish(req, FinishReason.ABORT)
        self.waiting = deque(r for r in self.waiting if not r.finished)
        self.running = [r for r in self.running if not r.finished]
        if self.chunked is not None and self.chunked.finished:
            self.chunked = None

    @property
    def has_work(self) -> bool:
        # Requests waiting only for their grammar are not work: the loop backs off meanwhile
        # instead of spinning against the compile threads (it still steps, and polls them).
        return bool(self.waiting or self.running or self.chunked or self.num_landing)

    # ---- one iteration ----
    def step(self, shutdown: bool = False) -> SyncDecision:
        """Schedule, MLP sync, forward, sample and apply: one iteration of a whole model (a
        pipeline stage runs the same parts, spread over micro-batches: scheduler/pipeline.py)."""
        start = time.perf_counter()
        batch, decision, sync_s = self.schedule(shutdown)
        ran: dict[str, Any] = {}
        run = batch_to_run(batch, decision, self.ps.rank)
        if run is not None:
            fb = run.to_forward_batch()
            plan = self.runner.gather_plan(fb)
            masks = self.grammars.start_fill(run.reqs, run.sample_mask)  # beside the forward
            t0 = time.perf_counter()
            logits, prompt = self.runner.forward_with_logprobs(fb, plan)
            ran = forward_stats(run, plan.total, plan.mode.value, time.perf_counter() - t0)
            self.after_forward(run)
            if run.forward_mode is not ForwardMode.IDLE:
                result = self.sample(run, logits, prompt, masks)
                self.apply(run, result)
                ran.update(result.stats)
        if batch is not None and batch.forward_mode is ForwardMode.PREBUILT:
            self._process_prebuilt(batch)
        self.record_stats(decision, sync_s, time.perf_counter() - start, ran)
        return decision

    def schedule(self, shutdown: bool = False) -> tuple[ScheduleBatch | None, SyncDecision, float]:
        """The next batch and the MLP sync over it: (batch, decision, the sync's seconds)."""
        self._poll_grammars()
        batch = self._next_batch()
        if batch is not None:
            rows = sample_rows(batch)
            for i in rows:
                batch.reqs[i].in_flight = True
            if batch.forward_mode.is_extend_like():
                self.num_landing += len(rows)
        t0 = time.perf_counter()
        batch, decision = prepare_mlp_sync_batch(
            self.ps, batch, self.cfg.skip_all_gather, shutdown, self.runner.graph_vote
        )
        return batch, decision, time.perf_counter() - t0

    def record_stats(
        self, decision: SyncDecision, sync_s: float, step_s: float, ran: dict[str, Any]
    ) -> None:
        self.last_stats = StepStats(
            global_num_tokens=tuple(decision.global_num_tokens),
            extending_groups=decision.extending_groups,
            sync_s=sync_s,
            sync_wait_s=decision.wait_s,
            sync_collective_s=decision.collective_s,
            step_s=step_s,
            running=len(self.running),
            queued=len(self.waiting),
            grammar_queue=len(self.grammars),
            retractions=self.num_retractions,
            **ran,
        )

    # ---- pipeline stages: decisions stage 0 takes for its lane (scheduler/pipeline.py) ----
    def lane_decisions(self) -> list[Any]:
        """Stage 0, before its control message goes out: decisions that depend on its own
        timing (a disaggregated prefill server's transfer states), which ride the message so
        that every stage applies them at the same point. None here."""
        return []

    def apply_lane_decisions(self, msgs: list[Any]) -> list[Any]:
        """Every stage: applies the decisions among a control message's `msgs`, returns the
        other messages."""
        return msgs

    def close(self) -> None:
        """Release what lives outside the rank's memory (threads; disaggregation: sockets)."""
        self.grammars.close()

    def take_outputs(self) -> list[RequestOutput]:
        out, self.outputs = self.outputs, []
        return out

    # ---- results ----
    def after_forward(self, batch: ScheduleBatch) -> None:
        """The batch's KV is computed: a prompt's next chunk may follow at once, and the computed
        prompt is shareable from the next batch on."""
        extend = batch.forward_mode.is_extend_like()
        for req in batch.reqs:
            req.kv_len += req.extend_len
            req.extend_len = 0
            if extend:
                self.cache.cache_unfinished(req)

    def sample(
        self,
        batch: ScheduleBatch,
        logits: torch.Tensor,
        prompt: PromptLogprobs | None = None,
        masks: MaskFill | None = None,
    ) -> StepResult:
        """Draw a token for each of the batch's sample rows (the last stage's part)."""
        rows = sample_rows(batch)
        if not rows:
            return StepResult(prompt=prompt)
        reqs = [batch.reqs[i] for i in rows]
        if len(rows) != len(batch.reqs):  # a prefill chunk that is not a prompt's last
            logits = logits[torch.tensor(rows, device=logits.device)]
        tokens, logprobs, tops, stats = sample_requests(reqs, logits, masks, rows)
        finish = [self._stop_after(req, token) for req, token in zip(reqs, tokens)]
        return StepResult(tokens, logprobs, tops, prompt, stats, finish)

    def _stop_after(self, req: Req, token: int) -> tuple[FinishReason, str | int | None] | None:
        """Whether `req` stops once `token` is appended (its grammar accepts the token here)."""
        req.output_ids.append(token)
        try:
            reason = self._stop_reason(req, token)
        finally:
            req.output_ids.pop()
        return None if reason is None else (reason, req.matched_stop)

    def apply(self, batch: ScheduleBatch, result: StepResult | SkippedResult) -> None:
        """The batch's result reaches this scheduler: new tokens, finished and scored requests,
        prompt logprobs. Reads `result` only where the batch produced something (needs_output)."""
        if batch.prompt_logprobs is not None:
            collect_prompt_logprobs(batch.reqs, result.prompt)
        for req, last in zip(batch.reqs, batch.sample_mask):
            if last and req.params.max_new_tokens == 0 and not req.finished:
                self._finish_scored(req)
        rows = sample_rows(batch)
        if not rows:
            return
        extend = batch.forward_mode.is_extend_like()
        self.num_landing -= len(rows) if extend else 0
        outcome = zip(rows, result.tokens, result.logprobs, result.tops, result.finish)
        for i, token, logprob, top, stop in outcome:
            req = batch.reqs[i]
            req.in_flight = False
            if req.finished:  # aborted while its token was on its way
                continue
            req.output_ids.append(token)
            req.output_logprobs.append(logprob)
            reason = None
            if stop is not None:
                reason, req.matched_stop = stop
            if reason is not None:
                self._finish(req, reason, emit=False)
            elif extend:  # a prefill's last chunk: now it decodes
                self.running.append(req)
            self.outputs.append(token_output(req, token, logprob, top, reason))
        self.running = [r for r in self.running if not r.finished]

    def _finish_scored(self, req: Req) -> None:
        self._finish(req, FinishReason.LENGTH, emit=False)
        self.outputs.append(scored_output(req))

    def _process_prebuilt(self, batch: ScheduleBatch) -> None:
        # Disaggregated decode: the prompt's KV and the first token arrived from a prefill server
        # into the row and slots reserved in prealloc; these requests start decoding.
        for req in batch.reqs:
            if req.row is None or not req.output_ids:  # nothing reserved or arrived: cannot decode
                self._finish(req, FinishReason.ABORT)
                continue
            req.kv_len = req.seq_len - 1
            self.running.append(req)

    def _stop_reason(self, req: Req, token: int) -> FinishReason | None:
        return self.stop_rules.reason(req, token, self.runner.context_length)

    def _free_kv(self, req: Req) -> None:
        self.cache.release(req)  # its computed KV stays cached until evicted

    def flush_cache(self) -> int:
        """Drop every cached prefix no request holds (SGLang's /flush_cache)."""
        return self.cache.flush()

    def _finish(self, req: Req, reason: FinishReason, emit: bool = True) -> None:
        req.finish_reason = reason
        req.grammar = None
        self._free_kv(req)
        if emit:
            self.outputs.append(
                RequestOutput(req.rid, [], [], reason.value, prompt_tokens=len(req.input_ids))
            )
