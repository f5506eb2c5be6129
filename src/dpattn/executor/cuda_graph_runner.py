"""CUDA graphs of decode steps: captured at start-up for every (batch size, KV bucket), replayed
when the MLP sync's vote says every rank can (docs/design.md §3-4).

A replayed step pads this DP group's tokens to the captured batch size (MAX_LEN with every
group's slot that size, so the collectives recorded in the graph match on all ranks) and its
requests' KV to the bucket. Padding rows carry token 0 at position 0 and write only the pool's
padding slot; their logits are dropped. Collectives inside a graph must be NCCL ones: the
runner refuses to capture over the thread or gloo groups (graph_plan.graph_unavailable_reason).
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch
from torch import nn

from dpattn.distributed.parallel_state import ParallelState
from dpattn.executor.forward_batch import ForwardBatch
from dpattn.executor.graph_plan import bucket
from dpattn.kvcache.memory_pool import KVPool, ReqToTokenPool
from dpattn.layers.dp_attention import GatherPlan
from dpattn.layers.forward_context import ForwardContext, forward_context
from dpattn.layers.graph_attention_backend import GraphDecodeBackend

log = logging.getLogger(__name__)
WARMUP_RUNS = 2  # eager runs before a capture: lazy allocations and NCCL set-up happen there


class DecodeModel(Protocol):
    layers: nn.ModuleList

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor: ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor: ...


class CudaGraphRunner:
    def __init__(
        self,
        model: DecodeModel,
        ps: ParallelState,
        kv_pool: KVPool,
        req_to_token: ReqToTokenPool,
        windows: set[int | None],
        batch_sizes: list[int],
        kv_buckets: list[int],
    ) -> None:
        self.model, self.ps = model, ps
        self.batch_sizes, self.kv_buckets = batch_sizes, kv_buckets
        max_bs = batch_sizes[-1]
        dev = ps.device
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.backend = GraphDecodeBackend(kv_pool, req_to_token, windows, max_bs, kv_buckets[-1])
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        self.capture()

    def _plan(self, bs: int) -> GatherPlan:
        a, d = self.ps.attn_tp_size, self.ps.dp_size
        return GatherPlan.build([bs] * d, a, graph=True, graph_bs=bs)

    def _run(self, bs: int) -> torch.Tensor:
        """One decode forward over the static buffers: [bs, vocab] fp32 logits."""
        ctx = ForwardContext(self._plan(bs), self.ps, self.backend, None)
        with forward_context(ctx):
            hidden = self.model(self.input_ids[:bs], self.positions[:bs])
            return self.model.logits(hidden).float()

    @torch.inference_mode()
    def capture(self) -> None:
        """Every rank captures every graph, in the same order (the graphs hold collectives).
        Largest first, so the smaller ones reuse its memory in the shared pool."""
        ps = self.ps
        groups = (ps.world, ps.attn_tp, ps.world_cpu, ps.attn_tp_cpu)
        lockstep = [g.lockstep for g in groups]
        ps.set_lockstep(False)  # its probe reads the host: not allowed inside a capture
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.ps.device)
        try:
            for kv in reversed(self.kv_buckets):
                for bs in reversed(self.batch_sizes):
                    self.backend.fill(bs, kv, [], [], self.backend.out_cache_loc_buf[:0])
                    self.backend.prepare(bs, kv)
                    stream.wait_stream(torch.cuda.current_stream(self.ps.device))
                    with torch.cuda.stream(stream):
                        for _ in range(WARMUP_RUNS):
                            self._run(bs)
                    torch.cuda.current_stream(self.ps.device).wait_stream(stream)
                    self.backend.prepare(bs, kv)  # masks not cached: computed in the graph
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool, stream=stream):
                        self.outputs[(bs, kv)] = self._run(bs)
                    self.graphs[(bs, kv)] = graph
        finally:
            for g, on in zip(groups, lockstep):
                g.lockstep = on
            self.ps.trace.take()  # start-up only: not part of any step's collectives
        torch.cuda.synchronize(self.ps.device)
        log.info(
            "captured %d decode CUDA graphs: batch sizes %s, KV buckets %s",
            len(self.graphs),
            self.batch_sizes,
            self.kv_buckets,
        )

    def replay(self, batch: ForwardBatch, plan: GatherPlan) -> torch.Tensor:
        """Logits [n, vocab] of this rank's n decode rows (a view of the graph's output: read
        it before the next replay). `plan` is the step's graph plan: its slot is the size."""
        bs, n = plan.lens[0], batch.num_tokens
        kv = bucket(max(batch.seq_lens, default=1), self.kv_buckets)
        if kv is None or (bs, kv) not in self.graphs:
            raise ValueError(f"no graph for {n} tokens padded to {bs} and KV length {kv}")
        self.input_ids[:n].copy_(batch.input_ids)
        self.input_ids[n:bs].zero_()
        self.positions[:n].copy_(batch.positions)
        self.positions[n:bs].zero_()
        self.backend.fill(bs, kv, batch.req_pool_indices, batch.seq_lens, batch.out_cache_loc)
        self.graphs[(bs, kv)].replay()
        return self.outputs[(bs, kv)][:n]
