"""Why a request stops after a new token: its grammar, stop tokens, stop strings, its length."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dpattn.scheduler.schedule_batch import FinishReason, Req


@dataclass
class StopRules:
    eos_ids: set[int]
    # Loaded the first time a request has stop strings (see Scheduler.tokenizer).
    tokenizer: Callable[[], Any] | None

    def reason(self, req: Req, token: int, context_length: int) -> FinishReason | None:
        """None: the request goes on. Called once per new token (sampled, or a disaggregated
        decode server's first token from the prefill side), so a grammar accepts it here."""
        p = req.params
        if req.grammar is not None:
            if not req.grammar.accept_token(token):  # the mask allowed it: a backend fault
                return FinishReason.ABORT
            if req.grammar.is_terminated():  # the grammar's end: it took a stop token
                req.matched_stop = token
                return FinishReason.STOP
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids):
            req.matched_stop = token
            return FinishReason.STOP
        tokenizer = self.tokenizer() if p.stop and self.tokenizer is not None else None
        if tokenizer is not None:
            # Only the tail can hold a newly completed stop string (an earlier one would have
            # stopped an earlier step); 4 tokens per character covers split UTF-8 bytes.
            text = tokenizer.decode(req.output_ids[-4 * max(map(len, p.stop)) - 4 :])
            for s in p.stop:
                if s in text:
                    req.matched_stop = s
                    return FinishReason.STOP
        if len(req.output_ids) >= p.max_new_tokens or req.seq_len >= context_length:
            return FinishReason.LENGTH
        return None
