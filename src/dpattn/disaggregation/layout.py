"""What the two sides must agree on, and which prefill rank sends which KV heads where.

KV heads follow the attention layer's split (layers/attention.py): with H KV heads and an
attention-TP width A, rank a holds heads [a·H/A, (a+1)·H/A) when H >= A, else a copy of head
a·H // A. A decode rank takes each of its heads from the lowest prefill rank holding it, so a
replicated head is sent once and different widths on the two sides split or join the slices.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class KVLayout:
    page_size: int
    dtype: str  # torch dtype name, e.g. "float32"
    head_dim: int
    num_layers: int
    num_kv_heads: int  # of the whole model (not this rank's share)

    def mismatch(self, other: KVLayout) -> str | None:
        """Why KV of this (prefill) layout cannot go into a pool of `other` (None: it can)."""
        diffs = [
            f"{name} {getattr(self, name)} vs {getattr(other, name)}"
            for name in ("dtype", "head_dim", "num_layers", "num_kv_heads", "page_size")
            if getattr(self, name) != getattr(other, name)
        ]
        return "KV layout mismatch (prefill vs decode): " + ", ".join(diffs) if diffs else None


@dataclass(frozen=True)
class RankInfo:
    """What a prefill rank registers with its server's bootstrap service."""

    dp_rank: int
    dp_size: int
    attn_tp_rank: int
    attn_tp_size: int
    endpoint: str  # tcp://host:port of its ZMQ PULL socket (handshakes, aborts)
    kv: KVLayout

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RankInfo:
        return cls(**{**d, "kv": KVLayout(**d["kv"])})


def kv_heads_of(num_kv_heads: int, attn_tp_size: int, attn_tp_rank: int) -> list[int]:
    """The global KV heads an attention-TP rank holds."""
    if num_kv_heads >= attn_tp_size:
        per = num_kv_heads // attn_tp_size
        return list(range(attn_tp_rank * per, (attn_tp_rank + 1) * per))
    return [attn_tp_rank * num_kv_heads // attn_tp_size]


def source_rank(head: int, num_kv_heads: int, prefill_attn_tp_size: int) -> int:
    """The lowest prefill attention-TP rank holding `head`."""
    for a in range(prefill_attn_tp_size):
        if head in kv_heads_of(num_kv_heads, prefill_attn_tp_size, a):
            return a
    raise ValueError(f"no prefill rank holds KV head {head}")


def plan_targets(
    num_kv_heads: int, prefill_attn_tp_size: int, decode_endpoints: list[str]
) -> dict[int, list[tuple[str, list[int]]]]:
    """prefill attention-TP rank -> [(decode endpoint, global heads to send it)].

    decode_endpoints[a] is the endpoint of decode attention-TP rank a (the group's width is
    len(decode_endpoints)). Every prefill rank appears, possibly with no target.
    """
    plan: dict[int, list[tuple[str, list[int]]]] = {a: [] for a in range(prefill_attn_tp_size)}
    width = len(decode_endpoints)
    for a_d, endpoint in enumerate(decode_endpoints):
        by_source: dict[int, list[int]] = {}
        for h in kv_heads_of(num_kv_heads, width, a_d):
            by_source.setdefault(source_rank(h, num_kv_heads, prefill_attn_tp_size), []).append(h)
        for a_p, heads in sorted(by_source.items()):
            plan[a_p].append((endpoint, heads))
    return plan


def expected_sources(
    num_kv_heads: int, prefill_attn_tp_size: int, decode_attn_tp_size: int, decode_rank: int
) -> set[int]:
    """The prefill attention-TP ranks a decode rank receives KV (and aux) from."""
    heads = kv_heads_of(num_kv_heads, decode_attn_tp_size, decode_rank)
    return {source_rank(h, num_kv_heads, prefill_attn_tp_size) for h in heads}
