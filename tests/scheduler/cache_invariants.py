"""The prefix cache's invariants (issue 15), checked between scheduler steps: every KV slot is
in exactly one of free / cached (locked or not) / owned by one request, and every node's lock
count equals the requests whose cached prefix passes through it."""

from __future__ import annotations

from collections import Counter

import torch

from dpattn.kvcache.prefix_cache import RadixCache
from dpattn.kvcache.radix_tree import TreeNode
from dpattn.scheduler.scheduler import Scheduler


def holders(sched: Scheduler) -> list:
    """Requests that hold a row (running, the partly prefilled one, none of the waiting)."""
    reqs = [*sched.running, *([sched.chunked] if sched.chunked else [])]
    assert all(r.row is None for r in sched.waiting), "a waiting request holds a row"
    return [r for r in reqs if r.row is not None]


def check_cache_invariants(sched: Scheduler) -> None:
    pool, cache = sched.runner.kv_pool, sched.cache
    reqs = holders(sched)
    parts = [pool.free_slots(), cache.cached_slots()]
    for r in reqs:
        assert r.extend_len == 0
        parts.append(sched.runner.req_to_token.table[r.row, r.prefix_len : r.kv_len])
    every = torch.cat(parts)
    assert every.numel() == pool.size, f"{every.numel()} slots accounted for, pool has {pool.size}"
    assert torch.unique(every).numel() == pool.size, "a KV slot has two owners"
    if not isinstance(cache, RadixCache):
        assert all(r.prefix_len == 0 for r in reqs)
        return
    tree = cache.tree
    expected: Counter[int] = Counter()
    for r in reqs:
        node: TreeNode | None = r.last_node
        assert node is not None
        while node is not None and node is not tree.root:
            expected[id(node)] += 1
            node = node.parent
    protected = evictable = 0
    for node in tree.nodes():
        assert node.lock_ref == expected[id(node)], "lock count != requests holding the node"
        if node.lock_ref:
            protected += len(node.key)
        else:
            evictable += len(node.key)
    assert (protected, evictable) == (tree.protected_size, tree.evictable_size)
    for r in reqs:  # a request's cached prefix is the path to its node
        path, node = [], r.last_node
        while node is not tree.root:
            path[:0] = node.key
            node = node.parent
        assert path == r.all_ids[: r.prefix_len]
