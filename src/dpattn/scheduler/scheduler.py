"""Per-rank scheduler: continuous batching (prefill first, chunked prefill, decode, retraction)
with the MLP sync every iteration. Transport-agnostic: messages in, outputs out."""

from __future__ import annotations

import itertools
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
from dpattn.scheduler.grammar_queue import GrammarQueue
from dpattn.scheduler.mlp_sync import SyncDecision, batch_to_run, prepare_mlp_sync_batch
from dpattn.scheduler.schedule_batch import (
    FinishReason,
    Req,
    ScheduleBatch,
    collect_prompt_logprobs,
    sample_requests,
    token_output,
)
from dpattn.scheduler.stop import StopRules

LPM_MAX_QUEUE = 128


class Scheduler:
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
        self.cache = make_prefix_cache(
            runner.kv_pool, runner.req_to_token, cfg.disable_radix_cache, cfg.page_size
        )
        backend = make_backend(
            cfg.grammar_backend, tokenizer, runner.vocab_size, eos_ids, cfg.grammar_compile_timeout
        )
        self.grammars = GrammarQueue(backend, self.ps.attn_tp_cpu)

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
        return bool(self.waiting or self.running or self.chunked)

    # ---- one iteration ----
    def step(self, shutdown: bool = False) -> SyncDecision:
        start = time.perf_counter()
        self._poll_grammars()
        batch = self._next_batch()
        t0 = time.perf_counter()
        batch, decision = prepare_mlp_sync_batch(
            self.ps, batch, self.cfg.skip_all_gather, shutdown, self.runner.graph_vote
        )
        sync_s = time.perf_counter() - t0
        ran: dict[str, Any] = {}
        run = batch_to_run(batch, decision, self.ps.rank)
        if run is not None:
            fb = run.to_forward_batch()
            plan = self.runner.gather_plan(fb)
            masks = self.grammars.start_fill(run.reqs, run.sample_mask)  # beside the forward
            t0 = time.perf_counter()
            logits, prompt = self.runner.forward_with_logprobs(fb, plan)
            forward_s = time.perf_counter() - t0
            idle = run.forward_mode is ForwardMode.IDLE
            ran = dict(
                forward_mode=run.forward_mode.name.lower(),
                num_tokens=run.num_tokens,
                padded_tokens=plan.total,
                padding_mode=plan.mode.value,
                idle_batch=idle,
                forward_s=forward_s,
            )
            if not idle:
                ran.update(self._process(run, logits, prompt, masks))
        if batch is not None and batch.forward_mode is ForwardMode.PREBUILT:
            self._process_prebuilt(batch)
        self.last_stats = StepStats(
            global_num_tokens=tuple(decision.global_num_tokens),
            extending_groups=decision.extending_groups,
            sync_s=sync_s,
            sync_wait_s=decision.wait_s,
            sync_collective_s=decision.collective_s,
            step_s=time.perf_counter() - start,
            running=len(self.running),
            queued=len(self.waiting),
            grammar_queue=len(self.grammars),
            retractions=self.num_retractions,
            **ran,
        )
        return decision

    def close(self) -> None:
        """Release what lives outside the rank's memory (threads; disaggregation: sockets)."""
        self.grammars.close()

    def take_outputs(self) -> list[RequestOutput]:
        out, self.outputs = self.outputs, []
        return out

    # ---- batch building ----
    def _next_batch(self) -> ScheduleBatch | None:
        batch = self._prefill_batch() or self._decode_batch()
        if batch is None and self.waiting:  # decode retracted everything: its slots are free now
            batch = self._prefill_batch()
        return batch

    def _prefill_batch(self) -> ScheduleBatch | None:
        cache, rows = self.cache, self.runner.req_to_token
        budget = self.cfg.chunked_prefill_size
        batch = ScheduleBatch(ForwardMode.EXTEND)
        locs = []
        chunked = [self.chunked] if self.chunked else []
        if self.cfg.schedule_policy == "lpm":
            self._sort_longest_prefix_first()
        # Prompts this step computes: an identical one (n > 1 choices) waits a step and then
        # finds the whole prompt cached.
        extending = {tuple(r.input_ids) for r in chunked}
        for req in itertools.chain(chunked, self.waiting):
            if budget <= 0 or len(self.running) + len(batch.reqs) >= self.cfg.max_running_requests:
                break
            if req.row is None:
                if self.cache.enabled and tuple(req.input_ids) in extending:
                    break
                req.row = rows.alloc()
                if req.row is None:
                    break
                matched = cache.match(req, self._match_limit(req))
                if req.cached_tokens < 0:
                    req.cached_tokens = min(matched, len(req.input_ids))
                if req.retracted and self.running and not self._room_to_finish(req):
                    cache.release(req)  # it waits for room (no row, no lock) and so do those behind
                    break
            # Keep one slot per running request so decode does not retract what prefill just took.
            n = min(req.seq_len - req.kv_len, budget, cache.available_size() - len(self.running))
            if n <= 0:
                if req is not self.chunked:  # a waiting request holds no row and no cache lock
                    cache.release(req)
                break
            slots = cache.alloc(n)
            extending.add(tuple(req.input_ids))
            rows.table[req.row, req.kv_len : req.kv_len + n] = slots
            batch.reqs.append(req)
            batch.input_ids += req.all_ids[req.kv_len : req.kv_len + n]
            batch.positions += range(req.kv_len, req.kv_len + n)
            batch.sample_mask.append(req.kv_len + n == req.seq_len)
            locs.append(slots)
            req.extend_len = n
            budget -= n
        if not batch.reqs:
            if self.chunked is not None and not self.running and not self._kv_held_elsewhere():
                # The partly prefilled prompt holds every free KV slot and nothing else can free
                # one: it is longer than the pool and would block the queue forever.
                self._finish(self.chunked, FinishReason.ABORT)
                self.chunked = None
            return None
        batch.out_cache_loc = torch.cat(locs)
        for _ in range(len(batch.reqs) - len(chunked)):  # the loop took a prefix of waiting
            self.waiting.popleft()
        last = batch.reqs[-1]
        self.chunked = None if batch.sample_mask[-1] else last
        return batch

    @staticmethod
    def _match_limit(req: Req) -> int:
        """How much of a request may come from the cache: never its last token (its logits are
        needed), and not the prompt positions whose logprobs it asks for (they need a forward)."""
        limit = req.seq_len - 1
        if req.return_logprob and req.logprob_start_len >= 0:
            want = max(1, req.logprob_start_len) + len(req.input_logprobs)
            limit = min(limit, want - 1)
        return limit

    def _sort_longest_prefix_first(self) -> None:
        # SGLang's lpm; a long queue falls back to fcfs (matching every request costs too much).
        if 1 < len(self.waiting) <= LPM_MAX_QUEUE and self.cache.enabled:
            keyed = [(-self.cache.match_len(r.all_ids), i, r) for i, r in enumerate(self.waiting)]
            self.waiting = deque(r for _, _, r in sorted(keyed, key=lambda k: k[:2]))

    def _decode_batch(self) -> ScheduleBatch | None:
        if not self.running:
            return None
        self._retract_until_fits()
        if not self.running:
            return None
        slots = self.cache.alloc(len(self.running))
        assert slots is not None
        reqs = list(self.running)
        positions = [r.kv_len for r in reqs]
        # one index_put for the whole batch (per-request tensor writes cost ~5 us each)
        self.runner.req_to_token.table[[r.row for r in reqs], positions] = slots
        for req in reqs:
            req.extend_len = 1
        return ScheduleBatch(
            ForwardMode.DECODE,
            reqs=reqs,
            input_ids=[r.last_id for r in reqs],
            positions=positions,
            out_cache_loc=slots,
            sample_mask=[True] * len(reqs),
        )

    def _retract_until_fits(self) -> None:
        """KV pool exhausted: send the newest running requests back to wait (output unchanged)."""
        while self.running and self.cache.available_size() < len(self.running):
            req = self.running.pop()
            # Alone and still too big: it cannot ever fit. A partly prefilled prompt holds slots
            # too, so with one the request is not alone: retracting it lets that prompt finish.
            alone = self.chunked is None and not self._kv_held_elsewhere()
            if not self.running and not self.waiting and alone:
                self._finish(req, FinishReason.ABORT)
                return
            self._free_kv(req)
            req.retracted = True
            self.waiting.appendleft(req)
            self.num_retractions += 1

    def _room_to_finish(self, req: Req) -> bool:
        """Whether a retracted request could run to its end beside the running ones' next step.
        Re-admitted any sooner, it is retracted again a few steps later: two long requests would
        take turns, one re-prefill per token."""
        remaining = min(
            req.params.max_new_tokens - len(req.output_ids),
            self.runner.context_length - req.seq_len,
        )
        need = req.seq_len - req.kv_len + max(0, remaining)
        return self.cache.available_size() - len(self.running) >= need

    def _kv_held_elsewhere(self) -> bool:
        """Whether requests outside the running batch and the partly prefilled prompt hold KV
        slots that will come back (then a request short of slots is not alone in the pool:
        waiting for them, it can still fit). None here; a disaggregated decode server's
        requests in transfer do."""
        return False

    # ---- results ----
    def _process(
        self,
        batch: ScheduleBatch,
        logits: torch.Tensor,
        prompt: PromptLogprobs | None = None,
        masks: MaskFill | None = None,
    ) -> dict[str, Any]:
        """Sample the rows that end a prompt or decode; returns the grammar masks' step stats."""
        if prompt is not None:
            collect_prompt_logprobs(batch.reqs, prompt)
        rows = []
        extend = batch.forward_mode.is_extend_like()
        for i, (req, do_sample) in enumerate(zip(batch.reqs, batch.sample_mask)):
            req.kv_len += req.extend_len
            req.extend_len = 0
            if extend:  # the computed prompt is shareable from the next step on
                self.cache.cache_unfinished(req)
            if do_sample and not req.finished:
                if req.params.max_new_tokens == 0:  # scoring only: the prompt's logprobs
                    self._finish_scored(req)
                else:
                    rows.append(i)
        if not rows:
            return {}
        reqs = [batch.reqs[i] for i in rows]
        if len(rows) != len(batch.reqs):  # a prefill chunk that is not a prompt's last
            logits = logits[torch.tensor(rows, device=logits.device)]
        tokens, logprobs, tops, stats = sample_requests(reqs, logits, masks, rows)
        for req, token, logprob, top in zip(reqs, tokens, logprobs, tops):
            req.output_ids.append(token)
            req.output_logprobs.append(logprob)
            reason = self._stop_reason(req, token)
            if reason is not None:
                self._finish(req, reason, emit=False)
            elif extend:  # a prefill's last chunk: now it decodes
                self.running.append(req)
            self.outputs.append(token_output(req, token, logprob, top, reason))
        self.running = [r for r in self.running if not r.finished]
        return stats

    def _finish_scored(self, req: Req) -> None:
        self._finish(req, FinishReason.LENGTH, emit=False)
        self.outputs.append(
            RequestOutput(
                req.rid,
                [],
                [],
                FinishReason.LENGTH.value,
                prompt_tokens=len(req.input_ids),
                input_logprobs=req.input_logprobs,
                input_top_logprobs=req.input_top_logprobs,
                cached_tokens=max(0, req.cached_tokens),
            )
        )

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
