"""Batch building of the per-rank scheduler: prefill first (chunked, prefix-cache aware), else
decode, retracting the newest running requests when the KV pool runs short."""

from __future__ import annotations

import itertools
from collections import deque

import torch

from dpattn.config import SchedulerConfig
from dpattn.executor.forward_batch import ForwardMode
from dpattn.executor.model_runner import ModelRunner
from dpattn.kvcache.prefix_cache import PrefixCache
from dpattn.scheduler.schedule_batch import FinishReason, Req, ScheduleBatch

LPM_MAX_QUEUE = 128


class BatchBuilder:
    """The scheduler's batch-building half (scheduler.py holds the state and the results)."""

    runner: ModelRunner
    cfg: SchedulerConfig
    cache: PrefixCache
    waiting: deque[Req]
    running: list[Req]
    chunked: Req | None  # a prompt being prefilled over several steps
    num_landing: int
    num_retractions: int

    def _finish(self, req: Req, reason: FinishReason, emit: bool = True) -> None:
        raise NotImplementedError

    def _free_kv(self, req: Req) -> None:
        raise NotImplementedError

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
        share = self._micro_batch_share()
        for req in itertools.chain(chunked, self.waiting):
            if budget <= 0 or self._num_decoding + len(batch.reqs) >= self.cfg.max_running_requests:
                break
            if len(batch.reqs) >= share:
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
            n = min(req.seq_len - req.kv_len, budget, cache.available_size() - self._num_decoding)
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
            if (
                self.chunked is not None
                and not self._num_decoding
                and not self._kv_held_elsewhere()
            ):
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

    def _micro_batch_share(self) -> int:
        """Pipeline stages: how many prompts one micro-batch may admit, so that requests that
        arrive together spread over the P micro-batches in flight (each then decodes its share,
        and no stage idles through the others' slots). A pure function of the scheduler's state,
        identical on every stage; no limit without stages."""
        p = self.runner.ps.pp_size
        if p == 1:
            return self.cfg.max_running_requests
        return max(1, -(-(len(self.waiting) + self._num_decoding) // p))

    @property
    def _num_decoding(self) -> int:
        """Requests that take a KV slot at their next decode: the running ones and the prompts
        whose first token is on its way (pipeline stages)."""
        return len(self.running) + self.num_landing

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
        reqs = self._retract_until_fits()
        if not reqs:
            return None
        slots = self.cache.alloc(len(reqs))
        assert slots is not None
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

    def _retract_until_fits(self) -> list[Req]:
        """KV pool exhausted: send the newest running requests back to wait (output unchanged).
        Returns the ones to decode: those whose last token is applied (with pipeline stages the
        others' tokens are still on their way around the ring)."""
        ready = [r for r in self.running if not r.in_flight]
        while ready and self.cache.available_size() < len(ready):
            req = ready.pop()
            self.running.remove(req)
            # Alone and still too big: it cannot ever fit. A partly prefilled prompt holds slots
            # too, so with one the request is not alone: retracting it lets that prompt finish.
            alone = self.chunked is None and not self.num_landing and not self._kv_held_elsewhere()
            if not self.running and not self.waiting and alone:
                self._finish(req, FinishReason.ABORT)
                return []
            self._free_kv(req)
            req.retracted = True
            self.waiting.appendleft(req)
            self.num_retractions += 1
        return ready

    def _room_to_finish(self, req: Req) -> bool:
        """Whether a retracted request could run to its end beside the running ones' next step.
        Re-admitted any sooner, it is retracted again a few steps later: two long requests would
        take turns, one re-prefill per token."""
        remaining = min(
            req.params.max_new_tokens - len(req.output_ids),
            self.runner.context_length - req.seq_len,
        )
        need = req.seq_len - req.kv_len + max(0, remaining)
        return self.cache.available_size() - self._num_decoding >= need

    def _kv_held_elsewhere(self) -> bool:
        """Whether requests outside the running batch and the partly prefilled prompt hold KV
        slots that will come back (then a request short of slots is not alone in the pool:
        waiting for them, it can still fit). None here; a disaggregated decode server's
        requests in transfer do."""
        return False
