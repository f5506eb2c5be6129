"""The forward context: what every layer of one forward needs, set once by the model runner.

Layers read it instead of taking metadata through every call: the DP gather plan (MLP side) and
the attention backend with this step's metadata (attention side).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.attention import sdpa_kernel

from dpattn.distributed.parallel_state import ParallelState
from dpattn.layers.attention_backend import CUDA_SDPA_BACKENDS, AttentionBackend
from dpattn.layers.dp_attention import GatherPlan


@dataclass
class ForwardContext:
    plan: GatherPlan
    ps: ParallelState
    attn_backend: AttentionBackend  # holds this forward's metadata (init_forward_metadata)
    # Real rows of the global (MLP) buffer, None if it has no padding: padding rows skip MoE.
    real_rows: torch.Tensor | None = None
    # Values the layers share within this forward, computed by the first (rotary cos / sin).
    memo: dict[Any, Any] = field(default_factory=dict)


_ctx: ContextVar[ForwardContext | None] = ContextVar("dpattn_forward_context", default=None)


def get_forward_context() -> ForwardContext:
    ctx = _ctx.get()
    if ctx is None:
        raise RuntimeError("no forward context: layers must run inside ModelRunner.forward")
    return ctx


@contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[None]:
    token = _ctx.set(ctx)
    cuda = ctx.ps.device.type == "cuda"
    try:
        with sdpa_kernel(CUDA_SDPA_BACKENDS) if cuda else nullcontext():  # once per forward
            yield
    finally:
        _ctx.reset(token)
