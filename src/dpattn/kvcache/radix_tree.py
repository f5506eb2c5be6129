"""A radix tree over token ids: the core of the prefix cache (values: KV slots) and of the DP
router's approximate per-group trees (values: none, only lengths count).

Recency is a logical clock, not wall time: every rank of a DP group runs the same operations in
the same order, so their trees (and what they evict) stay identical.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

Value = torch.Tensor | None


@dataclass(eq=False)
class TreeNode:
    key: list[int]  # the tokens on the edge into this node
    value: Value  # their KV slots (None in a tree that only tracks lengths)
    parent: TreeNode | None
    children: dict[Any, TreeNode] = field(default_factory=dict)
    lock_ref: int = 0  # running requests whose prefix ends at or below this node
    last_access: int = 0
    order: int = 0  # creation order: breaks recency ties deterministically

    @property
    def is_leaf(self) -> bool:
        return not self.children


class RadixTree:
    def __init__(self, page_size: int = 1) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1 (got {page_size})")
        self.page_size = page_size
        self._clock = itertools.count(1)
        self._order = itertools.count(1)
        self.reset()

    def reset(self) -> None:
        self.root = TreeNode([], None, None, lock_ref=1)  # the root is never evicted
        self.evictable_size = 0  # tokens in unlocked nodes
        self.protected_size = 0  # tokens in nodes some running request holds

    # ---- lookups ----
    def _child_key(self, key: list[int]) -> Any:
        return key[0] if self.page_size == 1 else tuple(key[: self.page_size])

    def _common(self, a: list[int], b: list[int]) -> int:
        n = 0
        for x, y in zip(a, b):
            if x != y:
                break
            n += 1
        return n - n % self.page_size

    def aligned(self, n: int) -> int:
        return n - n % self.page_size

    def match_prefix(self, key: list[int], touch: bool = True) -> tuple[list[Value], TreeNode, int]:
        """The values along the longest cached prefix of key, the node it ends at (an edge
        matched partly is split there) and its length. touch=False only looks (no split, no
        recency update)."""
        key = key[: self.aligned(len(key))]
        node, values, length = self.root, [], 0
        now = next(self._clock) if touch else 0
        while key:
            child = node.children.get(self._child_key(key))
            if child is None:
                break
            n = self._common(child.key, key)
            if n == 0:
                break
            if n < len(child.key):
                if not touch:
                    values.append(_slice(child.value, 0, n))
                    return values, node, length + n
                child = self._split(child, n)
            if touch:
                child.last_access = now
            values.append(child.value)
            node, key, length = child, key[n:], length + n
        return values, node, length

    def match_len(self, key: list[int]) -> int:
        return self.match_prefix(key, touch=False)[2]

    # ---- updates ----
    def insert(self, key: list[int], value: Value) -> int:
        """Add key (page-aligned part) with its values; returns how many of its leading tokens
        were already in the tree (the caller frees its own copies of those)."""
        key = key[: self.aligned(len(key))]
        node, done = self.root, 0
        now = next(self._clock)
        while key:
            child = node.children.get(self._child_key(key))
            if child is None:
                new = TreeNode(key, _slice(value, done, None), node, last_access=now)
                new.order = next(self._order)
                node.children[self._child_key(key)] = new
                self.evictable_size += len(key)
                return done
            n = self._common(child.key, key)
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = now
            node, key, done = child, key[n:], done + n
        return done

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Cut child's edge after n tokens: a new parent holds the first n."""
        parent = child.parent
        assert parent is not None
        head = TreeNode(child.key[:n], _slice(child.value, 0, n), parent)
        head.lock_ref, head.last_access, head.order = child.lock_ref, child.last_access, child.order
        child.key, child.value, child.parent = child.key[n:], _slice(child.value, n, None), head
        head.children[self._child_key(child.key)] = child
        parent.children[self._child_key(head.key)] = head
        return head

    def lock(self, node: TreeNode) -> None:
        while node is not self.root:
            if node.lock_ref == 0:
                self.evictable_size -= len(node.key)
                self.protected_size += len(node.key)
            node.lock_ref += 1
            node = node.parent  # type: ignore[assignment]

    def unlock(self, node: TreeNode) -> None:
        while node is not self.root:
            assert node.lock_ref > 0, "unlock without lock"
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.evictable_size += len(node.key)
                self.protected_size -= len(node.key)
            node = node.parent  # type: ignore[assignment]

    def evict(self, num_tokens: int, free: Callable[[Value], None]) -> int:
        """Drop least recently used unlocked leaves until num_tokens are gone; returns how many."""
        heap = [(n.last_access, n.order, n) for n in self.nodes() if n.is_leaf and not n.lock_ref]
        heapq.heapify(heap)
        evicted = 0
        while evicted < num_tokens and heap:
            _, _, leaf = heapq.heappop(heap)
            free(leaf.value)
            evicted += len(leaf.key)
            self.evictable_size -= len(leaf.key)
            parent = leaf.parent
            assert parent is not None
            del parent.children[self._child_key(leaf.key)]
            if parent is not self.root and parent.is_leaf and not parent.lock_ref:
                heapq.heappush(heap, (parent.last_access, parent.order, parent))
        return evicted

    # ---- inspection (invariants, tests) ----
    def nodes(self) -> Iterator[TreeNode]:
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def total_size(self) -> int:
        return self.evictable_size + self.protected_size

    def digest(self) -> list[tuple[tuple[int, ...], tuple[int, ...], int]]:
        """Every node as (path tokens, values, lock_ref), sorted: equal across a group's ranks."""
        out = []
        for node in self.nodes():
            path, up = [], node
            while up is not None and up is not self.root:
                path[:0] = up.key
                up = up.parent
            vals = () if node.value is None else tuple(node.value.tolist())
            out.append((tuple(path), vals, node.lock_ref))
        return sorted(out)


def _slice(value: Value, start: int, end: int | None) -> Value:
    return None if value is None else value[start:end]
