"""Requests waiting for their grammar: admitted only once every rank that samples them has it.

All attn_tp ranks of a DP group receive the same requests in the same order, but each compiles
on its own threads, so "ready" is a local fact. Each step with a non-empty queue (the same steps
on every rank of the group: the queue's contents are identical) the ranks all-gather one status
per queued request and act on the minimum (executor/grammar.py: GrammarStatus): a request moves
to the waiting queue on every rank in the same step, or fails on every rank in the same step.
With pipeline stages the minimum is also taken over the lane (`pp_group`: every stage holds the
same queue at the same micro-batch), so every stage admits the request in the same micro-batch;
only the last stage samples, but each stage's scheduler must hold the same requests.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from dpattn.distributed.group import Group
from dpattn.executor.grammar import GrammarBackend, GrammarStatus, MaskFill
from dpattn.scheduler.schedule_batch import Req


class GrammarQueue:
    def __init__(self, backend: GrammarBackend, group: Group, lane: Group | None = None) -> None:
        self.backend = backend
        # The DP group's attn_tp ranks (all of them sample its requests), then, with pipeline
        # stages, the lane's stages (all of them schedule its requests).
        self.groups = [group] if lane is None else [group, lane]
        self.reqs: list[tuple[Req, float]] = []  # (request, when it arrived)
        self._fill_pool: ThreadPoolExecutor | None = None  # made by the first constrained step

    def __len__(self) -> int:
        return len(self.reqs)

    def add(self, req: Req) -> None:
        assert req.params.grammar is not None
        self.backend.submit(req.params.grammar)
        self.reqs.append((req, time.monotonic()))

    def remove(self, rid: str) -> list[Req]:
        gone = [r for r, _ in self.reqs if r.rid == rid]
        self.reqs = [(r, t) for r, t in self.reqs if r.rid != rid]
        return gone

    def poll(self) -> tuple[list[Req], list[tuple[Req, str]]]:
        """(requests ready on every rank, in arrival order, with their matchers attached;
        (request, why) for those that failed on some rank)."""
        if not self.reqs:
            return [], []
        now = time.monotonic()
        local = [self.backend.status(r.params.grammar, now - t) for r, t in self.reqs]  # type: ignore[arg-type]
        codes = torch.tensor([[int(s) for s, _ in local]], dtype=torch.int64)
        for group in self.groups:
            codes = group.all_gather(codes).amin(0, keepdim=True)
        agreed = codes[0].tolist()
        reasons: Iterator[str] = iter(())
        if GrammarStatus.FAILED in agreed:  # every rank knows it: each says why, if it knows
            told = [why for code, (_, why) in zip(agreed, local) if code == GrammarStatus.FAILED]
            for group in self.groups:
                told = [
                    next((w for w in ws if w), "") for ws in zip(*group.all_gather_object(told))
                ]
            reasons = iter(told)
        ready: list[Req] = []
        failed: list[tuple[Req, str]] = []
        keep: list[tuple[Req, float]] = []
        for (req, t), code in zip(self.reqs, agreed):
            if code == GrammarStatus.READY:
                req.grammar = self.backend.matcher(req.params.grammar)  # type: ignore[arg-type]
                ready.append(req)
            elif code == GrammarStatus.FAILED:
                failed.append((req, next(reasons) or "the grammar failed to compile"))
            else:
                keep.append((req, t))
        self.reqs = keep
        return ready, failed

    def start_fill(self, reqs: list[Req], sample_mask: list[bool]) -> MaskFill | None:
        """Start filling the masks of the rows that sample under a grammar; None: no such row."""
        matchers = [r.grammar if s else None for r, s in zip(reqs, sample_mask)]
        if all(m is None for m in matchers):
            return None
        if self._fill_pool is None:
            self._fill_pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")
        return MaskFill(self._fill_pool, self.backend, matchers)

    def close(self) -> None:
        if self._fill_pool is not None:
            self._fill_pool.shutdown(wait=False)
        self.backend.close()
