"""DP router: which DP group (its attn_tp leader) gets a request."""

from __future__ import annotations

import itertools

from dpattn.config import ROUTER_POLICIES
from dpattn.kvcache.radix_tree import RadixTree

# cache_aware (SGLang router's defaults): a group whose load exceeds the least loaded one by
# more than BALANCE_ABS requests and BALANCE_REL times is imbalanced: route by load instead.
BALANCE_ABS = 32
BALANCE_REL = 1.5
CACHE_THRESHOLD = 0.5  # below this matched fraction, the least loaded group takes the request
TREE_MAX_TOKENS = 1 << 20  # per group: the approximate trees forget their oldest prompts


class DpRouter:
    """round_robin (default), shortest_queue (fewest in-flight requests), minimum_tokens
    (fewest in-flight prompt tokens), cache_aware (the group most likely to hold the prompt's
    prefix in its radix cache, unless loads are imbalanced); an explicit dp_rank always wins."""

    def __init__(self, policy: str, dp_size: int, tree_max_tokens: int = TREE_MAX_TOKENS) -> None:
        if policy not in ROUTER_POLICIES:
            raise ValueError(f"router_policy must be one of {ROUTER_POLICIES}")
        self.policy = policy
        self.dp_size = dp_size
        self.inflight = [0] * dp_size
        self.inflight_tokens = [0] * dp_size
        self._rr = itertools.count()
        # What was routed where: an approximation of each group's radix cache (no KV, lengths).
        self.trees = [RadixTree() for _ in range(dp_size)] if policy == "cache_aware" else []
        self.tree_max_tokens = tree_max_tokens

    def route(self, input_ids: list[int], dp_rank: int | None = None) -> int:
        if dp_rank is not None:
            if not 0 <= dp_rank < self.dp_size:
                raise ValueError(f"dp_rank {dp_rank} out of range for dp_size {self.dp_size}")
            d = dp_rank
        elif self.policy == "shortest_queue":
            d = self._least_loaded()
        elif self.policy == "minimum_tokens":
            d = min(range(self.dp_size), key=lambda g: self.inflight_tokens[g])
        elif self.policy == "cache_aware":
            d = self._cache_aware(input_ids)
        else:
            d = next(self._rr) % self.dp_size
        if self.trees:
            tree = self.trees[d]
            tree.insert(input_ids, None)
            if tree.evictable_size > self.tree_max_tokens:  # down to 90%: evict in batches
                tree.evict(tree.evictable_size - self.tree_max_tokens * 9 // 10, lambda _: None)
        self.inflight[d] += 1
        self.inflight_tokens[d] += len(input_ids)
        return d

    def _least_loaded(self) -> int:
        return min(range(self.dp_size), key=lambda g: self.inflight[g])

    def _cache_aware(self, input_ids: list[int]) -> int:
        lo, hi = min(self.inflight), max(self.inflight)
        if hi - lo > BALANCE_ABS and hi > BALANCE_REL * lo:
            return self._least_loaded()
        matched = [t.match_prefix(input_ids)[2] for t in self.trees]  # touch: recency counts
        best = max(range(self.dp_size), key=lambda g: (matched[g], -self.inflight[g]))
        if matched[best] >= CACHE_THRESHOLD * len(input_ids):
            return best
        return self._least_loaded()

    def finished(self, dp_rank: int, n_tokens: int) -> None:
        self.inflight[dp_rank] -= 1
        self.inflight_tokens[dp_rank] -= n_tokens
