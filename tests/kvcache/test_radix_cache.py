"""The radix tree and the prefix cache on a real KV pool: matching, splitting, locking, LRU
eviction, page alignment, and the slot ownership invariant."""

from __future__ import annotations

import torch

from dpattn.executor.sampling_params import SamplingParams
from dpattn.kvcache.memory_pool import KVPool, ReqToTokenPool
from dpattn.kvcache.prefix_cache import RadixCache
from dpattn.kvcache.radix_tree import RadixTree
from dpattn.runtime.router import DpRouter
from dpattn.scheduler.schedule_batch import Req


def t(*xs: int) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.int64)


def test_match_splits_an_edge_and_insert_reports_what_was_there() -> None:
    tree = RadixTree()
    assert tree.insert([1, 2, 3, 4], t(10, 11, 12, 13)) == 0
    values, node, n = tree.match_prefix([1, 2, 9])
    assert n == 2 and torch.equal(torch.cat(values), t(10, 11))
    assert node.key == [1, 2] and len(node.children) == 1  # split at the match
    assert tree.insert([1, 2, 5], t(20, 21, 22)) == 2  # the caller frees its slots 20, 21
    assert tree.match_len([1, 2, 5, 6]) == 3 and tree.match_len([1, 2, 3, 4, 5]) == 4
    assert tree.evictable_size == 5 and tree.protected_size == 0


def test_locked_prefixes_are_never_evicted_and_lru_goes_first() -> None:
    tree, freed = RadixTree(), []
    tree.insert([1, 2, 3], t(0, 1, 2))
    tree.insert([7, 8], t(3, 4))
    tree.insert([1, 2, 4], t(5, 6, 7))  # shares [1, 2]: a node with two leaves below
    _, node, _ = tree.match_prefix([1, 2, 3])
    tree.lock(node)
    assert (tree.protected_size, tree.evictable_size) == (3, 3)  # [1,2] + [3]; [7,8] + [4]
    evicted = tree.evict(10, lambda v: freed.append(v.tolist()))
    assert evicted == 3 and freed == [[3, 4], [7]]  # [7, 8] was used least recently
    assert tree.match_len([1, 2, 3]) == 3 and tree.match_len([7, 8]) == 0
    tree.unlock(node)
    assert tree.evict(10, lambda v: freed.append(v.tolist())) == 3
    assert tree.total_size() == 0 and not list(tree.nodes())


def test_pages_match_and_insert_whole_pages_only() -> None:
    tree = RadixTree(page_size=2)
    assert tree.insert([1, 2, 3, 4, 5], t(0, 1, 2, 3, 4)) == 0
    assert tree.total_size() == 4  # the half page [5] is not cached
    assert tree.match_len([1, 2, 3, 9]) == 2 and tree.match_len([1, 9]) == 0


def _cache(size: int = 16) -> tuple[RadixCache, KVPool, ReqToTokenPool]:
    pool = KVPool(size, 1, 1, 2, torch.float32, torch.device("cpu"))
    rows = ReqToTokenPool(4, 32, torch.device("cpu"))
    return RadixCache(pool, rows), pool, rows


def _req(rid: str, ids: list[int]) -> Req:
    return Req(rid, ids, SamplingParams(max_new_tokens=4), seed=0)


def _compute(cache: RadixCache, rows: ReqToTokenPool, req: Req) -> None:
    """What the scheduler does for a prefill: allocate the uncached part, 'run' it."""
    req.row = rows.alloc()
    cache.match(req, len(req.input_ids) - 1)
    n = len(req.input_ids) - req.kv_len
    rows.table[req.row, req.kv_len : req.kv_len + n] = cache.alloc(n)
    req.kv_len += n
    cache.cache_unfinished(req)


def test_a_second_request_reuses_the_first_ones_prompt_and_the_pool_comes_back() -> None:
    cache, pool, rows = _cache()
    a, b = _req("a", [5, 6, 7, 8, 9]), _req("b", [5, 6, 7, 1])
    _compute(cache, rows, a)
    _compute(cache, rows, b)
    assert b.prefix_len == 4 and b.cached_tokens == -1  # scheduler sets cached_tokens
    assert torch.equal(rows.table[b.row, :3], rows.table[a.row, :3])  # shared slots
    assert pool.available_size() == 16 - 5 - 1  # b computed one token of its own
    assert cache.tree.protected_size == 6 and cache.available_size() == 10
    cache.release(a)
    cache.release(b)
    assert cache.available_size() == 16 and cache.tree.evictable_size == 6
    taken = cache.alloc(12)  # evicts what it needs (2 slots), least recently used first
    assert taken is not None and cache.tree.total_size() == 6 - 2
    assert cache.flush() == 4 and cache.tree.total_size() == 0
    assert pool.available_size() == 16 - 12


def test_cache_aware_routing_follows_the_prefix_until_loads_are_imbalanced() -> None:
    router = DpRouter("cache_aware", 2)
    system = list(range(100, 164))
    first = router.route(system + [1])
    assert all(router.route(system + [i]) == first for i in range(2, 10))
    other = router.route(list(range(300, 364)))  # no match anywhere: the least loaded group
    assert other != first
    rr = DpRouter("round_robin", 2)
    assert {rr.route(system + [i]) for i in range(4)} == {0, 1}
    for _ in range(40):  # first's group is now far busier: imbalance wins over the match
        router.route(system + [7], dp_rank=first)
    assert router.route(system + [8]) != first
