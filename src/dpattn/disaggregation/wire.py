"""The messages between prefill and decode ranks (ZMQ, pickled headers, raw KV bytes).

decode leader -> each prefill rank of the request's group: `KVInit` (the handshake: where to
send which heads). prefill rank -> decode rank, in this order on one PUSH/PULL connection:
one `KVChunk` per layer and prefill chunk (header + K bytes + V bytes, or header + latent bytes
for an MLA model), then `KVAux` (first token, logprobs, the room as a check). Either way: `KVAbort` (the other side gave the request up).

A prefill server with pipeline stages: the decode leader sends `KVInit` to stage 0's ranks only
(stage 0 hands it on to its lane, prefill_pipeline.py); every stage's rank sends its own layers'
`KVChunk`s (global layer indices) and then its own `KVAux`, each marked with its stage.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field

import torch

from dpattn.disaggregation.layout import KVLayout


@dataclass(frozen=True)
class KVInit:
    room: int
    targets: list[tuple[str, list[int]]]  # (decode endpoint, global KV heads to send there)
    decode_kv: KVLayout
    num_tokens: int  # prompt tokens the decode side reserved slots for


@dataclass(frozen=True)
class KVAbort:
    room: int
    reason: str


@dataclass(frozen=True)
class KVChunk:
    room: int
    start: int  # first prompt position of these tokens (chunked prefill sends as it goes)
    layer: int
    heads: list[int]  # global KV heads, in the order of the tensors' head dimension
    source: int  # prefill attention-TP rank
    shape: tuple[int, int, int]  # tokens, heads, head_dim (of each buffer frame)
    dtype: str
    stage: int = 0  # the prefill server's pipeline stage that sent it (0 without stages)


@dataclass(frozen=True)
class KVAux:
    room: int
    source: int
    num_chunks: int  # KVChunks sent before this message
    first_token: int
    logprob: float
    top_logprobs: list[tuple[float, int]] = field(default_factory=list)
    input_logprobs: list[float] = field(default_factory=list)
    input_top_logprobs: list[list[tuple[float, int]]] = field(default_factory=list)
    stage: int = 0  # the prefill pipeline stage that sent it: each stage ends its own KV


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw bytes of a tensor of any dtype (bfloat16 has no numpy type: go through uint8)."""
    return t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()


def tensor_from(data: bytes, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return flat.view(getattr(torch, dtype)).view(shape)


def encode(header: object) -> bytes:
    return pickle.dumps(header)


def decode(frame: bytes) -> object:
    return pickle.loads(frame)
