"""What the two sides must agree on, and which prefill rank sends which KV heads where.

KV heads follow the attention layer's split (layers/attention.py): with H KV heads and an
attention-TP width A, rank a holds heads [a·H/A, (a+1)·H/A) when H >= A, else a copy of head
a·H // A. A decode rank takes each of its heads from the lowest prefill rank holding it, so a
replicated head is sent once and different widths on the two sides split or join the slices.

An MLA model's layout (kind "mla") is one latent row per token and layer (kv_lora_rank +
qk_rope_head_dim values, no V) held whole by every attention-TP rank: it plans as one KV head
(num_kv_heads 1) that every rank holds, so every decode rank takes the same rows, from prefill
rank 0, whatever the attention-TP widths on the two sides.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

KINDS = {"gqa": "GQA", "mla": "MLA"}  # layout kind -> its name in messages


@dataclass(frozen=True)
class KVLayout:
    page_size: int
    dtype: str  # torch dtype name, e.g. "float32"
    head_dim: int  # "mla": the latent row's width, kv_lora_rank + qk_rope_head_dim
    num_layers: int
    num_kv_heads: int  # of the whole model (not this rank's share); "mla": 1
    # "gqa": per-head K and V buffers per layer; "mla": one latent buffer per layer. A peer that
    # predates the field registers without it: it is a "gqa" one.
    kind: str = "gqa"
    kv_lora_rank: int = 0  # "mla": the latent's c_kv part (the rest is the rotated key part)

    @property
    def qk_rope_head_dim(self) -> int:
        return self.head_dim - self.kv_lora_rank if self.kind == "mla" else 0

    def describe(self) -> str:
        if self.kind == "mla":
            return (
                f"MLA latent rows of {self.head_dim} (kv_lora_rank {self.kv_lora_rank} + "
                f"qk_rope_head_dim {self.qk_rope_head_dim}, no V)"
            )
        if self.kind == "gqa":
            return f"GQA K and V of {self.num_kv_heads} KV heads x head_dim {self.head_dim}"
        return f"an unknown KV layout kind {self.kind!r}"

    def mismatch(self, other: KVLayout) -> str | None:
        """Why KV of this (prefill) layout cannot go into a pool of `other` (None: it can)."""
        prefix = "KV layout mismatch (prefill vs decode): "
        if self.kind != other.kind:
            names = [KINDS.get(k, repr(k)) for k in (self.kind, other.kind)]
            return (
                f"{prefix}attention kind {names[0]} vs {names[1]}: the prefill server caches "
                f"{self.describe()}, the decode server {other.describe()}; both sides must "
                "serve the same model"
            )
        fields = ["dtype", "head_dim", "num_layers", "num_kv_heads", "page_size"]
        labels = {"head_dim": "latent width"} if self.kind == "mla" else {}
        if self.kind == "mla":
            fields += ["kv_lora_rank", "qk_rope_head_dim"]
        diffs = [
            f"{labels.get(name, name)} {getattr(self, name)} vs {getattr(other, name)}"
            for name in fields
            if getattr(self, name) != getattr(other, name)
        ]
        return prefix + ", ".join(diffs) if diffs else None


@dataclass(frozen=True)
class RankInfo:
    """What a prefill rank registers with its server's bootstrap service."""

    dp_rank: int
    dp_size: int
    attn_tp_rank: int
    attn_tp_size: int
    endpoint: str  # tcp://host:port of its ZMQ PULL socket (handshakes, aborts)
    kv: KVLayout
    # Pipeline stages: the rank's stage and the global layers [layer_start, layer_end) whose KV
    # it holds and sends (layer_end None: all of kv.num_layers). A peer that predates the fields
    # registers without them: one stage holding every layer.
    pp_rank: int = 0
    pp_size: int = 1
    layer_start: int = 0
    layer_end: int | None = None

    @property
    def layers(self) -> tuple[int, int]:
        end = self.kv.num_layers if self.layer_end is None else self.layer_end
        return self.layer_start, end

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


def stage_coverage(group: list[RankInfo]) -> str | None:
    """Why the registered stages of one prefill DP group do not hold every layer exactly once
    (None: they do). Each stage's ranks hold the same layers; together they tile [0, L)."""
    stages: dict[int, tuple[int, int]] = {}
    for info in group:
        if stages.setdefault(info.pp_rank, info.layers) != info.layers:
            return f"prefill stage {info.pp_rank}'s ranks hold different layers"
    size = group[0].pp_size if group else 0
    spans = [stages[s] for s in sorted(stages)]
    ends = [0, *(end for _, end in spans)]
    tiled = [start for start, _ in spans] == ends[:-1] and ends[-1] == group[0].kv.num_layers
    if sorted(stages) != list(range(size)) or not tiled:
        return (
            f"the prefill server's {size} stage(s) registered layers {spans} for "
            f"{group[0].kv.num_layers} layers: every layer must come from exactly one stage"
        )
    return None
