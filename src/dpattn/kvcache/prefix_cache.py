"""The prefix cache of one rank, seen from the scheduler: requests' KV slots go in and out of a
radix tree (SGLang's radix cache), or straight back to the pool when the cache is disabled.

Ownership of a request's KV slots (row r of the request-to-token table):
  row[:req.prefix_len]          in the tree, held by the request's lock on req.last_node
  row[prefix_len:kv_len+extend] the request's own (computed since its last insert)
A slot is therefore in exactly one of: the pool's free list, the tree (locked or not), one
running request's own range. `owners()` lists them for the invariant checks.
"""

from __future__ import annotations

from typing import Protocol

import torch

from dpattn.kvcache.memory_pool import KVPool, ReqToTokenPool
from dpattn.kvcache.radix_tree import RadixTree, TreeNode


class CacheReq(Protocol):
    """What the cache reads and writes on a request (scheduler.schedule_batch.Req)."""

    row: int | None
    kv_len: int
    extend_len: int
    prefix_len: int
    last_node: TreeNode | None

    @property
    def all_ids(self) -> list[int]: ...


class PrefixCache:
    """No cache (--disable-radix-cache): every request computes its whole prompt."""

    enabled = False

    def __init__(self, pool: KVPool, rows: ReqToTokenPool) -> None:
        self.pool = pool
        self.rows = rows

    def available_size(self) -> int:
        """Slots an allocation can get: free ones plus cached ones no request holds."""
        return self.pool.available_size()

    def alloc(self, n: int) -> torch.Tensor | None:
        return self.pool.alloc(n)

    def match(self, req: CacheReq, limit: int) -> int:
        """Point the request's row at its longest cached prefix (at most limit tokens)."""
        return 0

    def match_len(self, ids: list[int]) -> int:
        """How long a match would be, without taking it."""
        return 0

    def cache_unfinished(self, req: CacheReq) -> None:
        """After an extend: the request's computed tokens become shareable."""

    def release(self, req: CacheReq) -> None:
        """The request leaves (finished, aborted or retracted): its KV goes to the cache or the
        pool, its row is freed."""
        if req.row is not None:
            table = self.rows.table[req.row]
            self.pool.free(table[req.prefix_len : req.kv_len + req.extend_len].clone())
            self.rows.free(req.row)
        req.row, req.kv_len, req.extend_len, req.prefix_len, req.last_node = None, 0, 0, 0, None

    def flush(self) -> int:
        """Drop every cached prefix no request holds; returns how many slots came free."""
        return 0

    def cached_size(self) -> int:
        return 0

    def cached_slots(self) -> torch.Tensor:
        return torch.zeros(0, dtype=torch.int64, device=self.pool.device)

    def digest(self) -> list[tuple[tuple[int, ...], tuple[int, ...], int]]:
        return []


class RadixCache(PrefixCache):
    """Prefixes of finished, chunked and running requests in a radix tree; least recently used
    unlocked leaves are evicted when an allocation needs their slots."""

    enabled = True

    def __init__(self, pool: KVPool, rows: ReqToTokenPool, page_size: int = 1) -> None:
        super().__init__(pool, rows)
        self.tree = RadixTree(page_size)

    def available_size(self) -> int:
        return self.pool.available_size() + self.tree.evictable_size

    def alloc(self, n: int) -> torch.Tensor | None:
        short = n - self.pool.available_size()
        if short > 0:
            self.tree.evict(short, self._free_value)
        return self.pool.alloc(n)

    def _free_value(self, value: torch.Tensor | None) -> None:
        if value is not None:
            self.pool.free(value)

    def match(self, req: CacheReq, limit: int) -> int:
        assert req.row is not None and req.kv_len == 0 and req.last_node is None
        values, node, n = self.tree.match_prefix(req.all_ids[: max(0, limit)])
        if n:
            self.rows.table[req.row, :n] = torch.cat(values)  # type: ignore[arg-type]
        self.tree.lock(node)
        req.last_node, req.prefix_len, req.kv_len = node, n, n
        return n

    def match_len(self, ids: list[int]) -> int:
        return self.tree.match_len(ids)

    def _insert(self, req: CacheReq) -> int:
        """Insert the request's computed tokens; free its copies of tokens the tree already had
        (another request inserted them meanwhile) and point its row at the tree's. Returns the
        length now in the tree."""
        assert req.row is not None
        n = self.tree.aligned(req.kv_len)
        slots = self.rows.table[req.row, :n].clone()
        had = self.tree.insert(req.all_ids[:n], slots)
        if had > req.prefix_len:
            self.pool.free(slots[req.prefix_len : had])
        return n

    def cache_unfinished(self, req: CacheReq) -> None:
        if req.row is None:
            return
        n = self._insert(req)
        values, node, m = self.tree.match_prefix(req.all_ids[:n])
        assert m == n, (m, n)
        if n:
            self.rows.table[req.row, :n] = torch.cat(values)  # type: ignore[arg-type]
        self.tree.lock(node)
        if req.last_node is not None:
            self.tree.unlock(req.last_node)
        req.last_node, req.prefix_len = node, n

    def release(self, req: CacheReq) -> None:
        if req.row is not None:
            n = self._insert(req)
            # Unaligned tail (page size > 1) and a step's slots never computed: back to the pool.
            self.pool.free(self.rows.table[req.row, n : req.kv_len + req.extend_len].clone())
            if req.last_node is not None:
                self.tree.unlock(req.last_node)
            self.rows.free(req.row)
        req.row, req.kv_len, req.extend_len, req.prefix_len, req.last_node = None, 0, 0, 0, None

    def flush(self) -> int:
        return self.tree.evict(self.tree.evictable_size, self._free_value)

    def cached_size(self) -> int:
        return self.tree.total_size()

    def cached_slots(self) -> torch.Tensor:
        values = [n.value for n in self.tree.nodes() if n.value is not None]
        return torch.cat([torch.zeros(0, dtype=torch.int64, device=self.pool.device), *values])

    def digest(self) -> list[tuple[tuple[int, ...], tuple[int, ...], int]]:
        return self.tree.digest()


def make_prefix_cache(
    pool: KVPool, rows: ReqToTokenPool, disable: bool, page_size: int = 1
) -> PrefixCache:
    return PrefixCache(pool, rows) if disable else RadixCache(pool, rows, page_size)
