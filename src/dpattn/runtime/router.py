"""DP router: which DP group (its attn_tp leader) gets a request."""

from __future__ import annotations

import itertools

from dpattn.config import ROUTER_POLICIES


class DpRouter:
    """round_robin (default), shortest_queue (fewest in-flight requests), minimum_tokens
    (fewest in-flight prompt tokens); an explicit dp_rank always wins."""

    def __init__(self, policy: str, dp_size: int) -> None:
        if policy not in ROUTER_POLICIES:
            raise ValueError(f"router_policy must be one of {ROUTER_POLICIES}")
        self.policy = policy
        self.dp_size = dp_size
        self.inflight = [0] * dp_size
        self.inflight_tokens = [0] * dp_size
        self._rr = itertools.count()

    def route(self, n_tokens: int, dp_rank: int | None = None) -> int:
        if dp_rank is not None:
            if not 0 <= dp_rank < self.dp_size:
                raise ValueError(f"dp_rank {dp_rank} out of range for dp_size {self.dp_size}")
            d = dp_rank
        elif self.policy == "shortest_queue":
            d = min(range(self.dp_size), key=lambda g: self.inflight[g])
        elif self.policy == "minimum_tokens":
            d = min(range(self.dp_size), key=lambda g: self.inflight_tokens[g])
        else:
            d = next(self._rr) % self.dp_size
        self.inflight[d] += 1
        self.inflight_tokens[d] += n_tokens
        return d

    def finished(self, dp_rank: int, n_tokens: int) -> None:
        self.inflight[dp_rank] -= 1
        self.inflight_tokens[dp_rank] -= n_tokens
