"""Model runner of one rank: the sharded model, its KV cache, and the forward entry.

With pipeline stages (models/stage.py) a runner holds one stage: its layers, and a KV pool of
those layers only. A stage that is not the last returns its hidden rows (`forward_hidden`), the
last one logits (`forward_with_logprobs`); every stage but the first takes the previous stage's
rows as `hidden`. Without stages (the default) the runner is the whole model, as before.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoConfig

from dpattn.config import RunnerConfig
from dpattn.distributed.parallel_state import ParallelState
from dpattn.executor.cuda_graph_runner import CudaGraphRunner
from dpattn.executor.forward_batch import ForwardBatch, ForwardMode
from dpattn.executor.graph_plan import (
    capture_batch_sizes,
    capture_kv_buckets,
    graph_batch_size,
    graph_unavailable_reason,
    local_vote,
)
from dpattn.executor.logprobs import (
    PromptLogprobRequest,
    PromptLogprobs,
    vocab_parallel_logprobs,
)
from dpattn.kvcache.budget import KVBudget, bytes_per_token, kv_budget
from dpattn.kvcache.memory_pool import KVPool, ReqToTokenPool
from dpattn.layers.attention_backend import TorchNativeBackend
from dpattn.layers.dp_attention import GatherPlan
from dpattn.layers.forward_context import ForwardContext, forward_context
from dpattn.layers.linear import can_prepack, prepack
from dpattn.layers.quant import WeightFormat
from dpattn.models.llama import ModelOptions
from dpattn.models.loader import load_weights
from dpattn.models.quantized import resolve_quantization
from dpattn.models.registry import build_model, text_config
from dpattn.models.stage import StageLayers, partition_layers

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self, cfg: RunnerConfig, ps: ParallelState, stage: StageLayers | None = None
    ) -> None:
        self.cfg = cfg
        self.ps = ps
        # The text config (a multimodal Gemma 3 config contributes its text_config).
        self.hf_config = text_config(AutoConfig.from_pretrained(cfg.model_path))
        self.stage = self._check_stage(stage, int(self.hf_config.num_hidden_layers))
        opts = ModelOptions(DTYPES[cfg.dtype], cfg.ep, cfg.moe_dense_tp_size, cfg.mla_mode)
        with torch.device(ps.device):
            # .to(): buffers made from CPU tensors (rotary frequencies) follow the parameters
            model = build_model(self.hf_config, ps, opts, self.stage)
            self.model = model.to(ps.device).eval()
        quantization = cfg.quantization or resolve_quantization(cfg.model_path, None)
        load_weights(self.model, Path(cfg.model_path), quantization)
        fmt = WeightFormat(
            quantization,
            cfg.quant_group_size,
            dense_prepack=not cfg.disable_weight_prepack and can_prepack(ps.device),
            int4_kernel=ps.device.type == "cpu",
            batch_path=cfg.quant_batch_path,
        )
        if fmt.dense_prepack or quantization not in ("none", "fp8"):
            prepack(self.model, fmt)
        hc = self.hf_config
        self.vocab_size = int(hc.vocab_size)  # the frontend checks token ids against this
        model_context = cfg.context_length or int(getattr(hc, "max_position_embeddings", 4096))
        attn = self.model.layers[0].self_attn
        v_dim = attn.cache_v_dim  # 0: an MLA layer caches one latent row per token, no V
        self.kv_budget = self._kv_budget(
            attn.num_kv_heads, attn.head_dim, v_dim, opts.dtype, model_context
        )
        # A request longer than the pool could never run alone: the pool bounds the context.
        self.context_length = min(model_context, self.kv_budget.tokens)
        self.kv_pool = KVPool(
            self.kv_budget.tokens,
            self.stage.num_layers,  # this stage's layers only (cache_layer indexes them)
            attn.num_kv_heads,
            attn.head_dim,
            opts.dtype,
            ps.device,
            v_dim,
        )
        self.req_to_token = ReqToTokenPool(cfg.max_running_requests, self.context_length, ps.device)
        windows = {layer.self_attn.sliding_window for layer in self.model.layers}
        self.attn_backend = TorchNativeBackend(self.kv_pool, self.req_to_token, windows)
        # Without gather metadata a rank cannot know other groups' sizes, nor pad for attn_tp.
        self.needs_gather_metadata = ps.dp_size > 1 or (
            ps.attn_tp_size > 1 and self.model.has_scattered_layers
        )
        self.graph_runner = self._capture_graphs(windows)

    def _check_stage(self, stage: StageLayers | None, num_layers: int) -> StageLayers:
        """The given stage, checked; else the one this rank's pipeline stage holds (the whole
        model at --pp-size 1)."""
        if stage is None:
            ps = self.ps
            if ps.pp_size == 1:
                return StageLayers.whole(num_layers)
            part = self.cfg.pp_layer_partition
            return partition_layers(num_layers, ps.pp_size, part)[ps.pp_rank]
        if stage.end > num_layers or stage.last != (stage.end == num_layers):
            raise ValueError(
                f"stage [{stage.start}, {stage.end}) (last={stage.last}) does not fit the "
                f"model's {num_layers} decoder layers"
            )
        return stage

    def _capture_graphs(self, windows: set[int | None]) -> CudaGraphRunner | None:
        """Decode CUDA graphs, or None with the reason logged (CPU, thread groups, disabled)."""
        cfg, ps = self.cfg, self.ps
        reason = graph_unavailable_reason(
            ps.device.type,
            ps.world.capturable and ps.attn_tp.capturable,
            cfg.disable_cuda_graph,
            ps.tp_size,
            cfg.dp_padding_mode,
        )
        if reason is None and cfg.mla_mode == "decompressed" and self.kv_pool.is_latent:
            reason = "--mla-mode decompressed (a graph decode step attends absorbed)"
        if reason is None and not self.stage.is_whole:
            # A captured step starts from token ids and ends in logits: a whole model's.
            reason = "a pipeline stage (graphs capture the whole model's decode step)"
        if reason is not None:
            if ps.device.type == "cuda" and ps.rank == 0:
                log.info("CUDA graphs off: %s", reason)
            return None
        sizes = capture_batch_sizes(
            cfg.cuda_graph_max_bs, ps.attn_tp_size, cfg.max_running_requests
        )
        buckets = capture_kv_buckets(cfg.cuda_graph_max_seq_len, self.context_length)
        return CudaGraphRunner(
            self.model, ps, self.kv_pool, self.req_to_token, windows, sizes, buckets
        )

    def graph_vote(self, mode: ForwardMode | None, num_tokens: int, max_seq_len: int) -> bool:
        """This rank's can_run_graph for the MLP sync (the step replays iff all ranks say yes)."""
        g = self.graph_runner
        if g is None:
            return False
        return local_vote(mode, num_tokens, max_seq_len, g.batch_sizes, g.kv_buckets)

    def _kv_budget(
        self, num_kv_heads: int, head_dim: int, v_dim: int, dtype: torch.dtype, context: int
    ) -> KVBudget:
        cfg, ps = self.cfg, self.ps
        layers = self.stage.num_layers  # a stage caches only its own layers
        per_token = bytes_per_token(layers, num_kv_heads, head_dim, dtype, v_dim)
        # On CPU every rank of the host (all stages) shares its memory (multi-node CPU:
        # conservative); on CUDA a rank process owns its GPU, thread ranks share one.
        sharing = ps.layout.world_size if ps.device.type == "cpu" else ps.ranks_per_device
        useful = cfg.max_running_requests * context
        budget = kv_budget(
            cfg.kv_pool_tokens, cfg.mem_fraction_static, per_token, ps.device, sharing, useful
        )
        if cfg.kv_pool_tokens is None and ps.tp_size > 1:
            # Measured sizes differ between ranks, but the ranks of a DP group run the same
            # schedule over their pools: all take the smallest (one gather, before any step).
            sizes = ps.world_cpu.all_gather(torch.tensor([[budget.tokens]], dtype=torch.int64))
            ps.trace.take()  # start-up only: not part of any step's collectives
            budget = dataclasses.replace(budget, tokens=int(sizes.min()))
        if cfg.kv_pool_tokens is None and ps.pp_size > 1:
            # Every stage's scheduler replays the same allocations, so a lane's pools must be
            # the same size in tokens, though a stage's token costs only its layers' bytes:
            # all take the lane's smallest (equal within each stage after the gather above).
            assert ps.pp_group is not None
            sizes = ps.pp_group.all_gather(torch.tensor([[budget.tokens]], dtype=torch.int64))
            ps.trace.take()
            budget = dataclasses.replace(budget, tokens=int(sizes.min()))
        return budget

    def gather_plan(self, batch: ForwardBatch) -> GatherPlan:
        gnt = batch.global_num_tokens
        if gnt is None:
            if self.needs_gather_metadata:
                raise ValueError(
                    f"batch ({batch.forward_mode.name}, {batch.num_tokens} tokens) reached the model "
                    f"runner without gather metadata (global_num_tokens), but tp={self.ps.tp_size} "
                    f"dp={self.ps.dp_size} with this MLP layout needs it: run the MLP sync first"
                )
            gnt = [batch.num_tokens]
        if len(gnt) != self.ps.dp_size or gnt[self.ps.dp_rank] != batch.num_tokens:
            raise ValueError(
                f"gather metadata {gnt} does not match dp_size {self.ps.dp_size} and this rank's "
                f"{batch.num_tokens} tokens in DP group {self.ps.dp_rank}"
            )
        return GatherPlan.build(
            list(gnt),
            self.ps.attn_tp_size,
            batch.is_extend_in_batch,
            self.cfg.dp_padding_mode,
            graph=batch.can_run_graph,
            native_reduce_scatter=self.ps.world.native_reduce_scatter,
            graph_bs=self._graph_bs(gnt, batch.can_run_graph),
        )

    def _graph_bs(self, gnt: list[int], voted: bool) -> int | None:
        """The captured size of a replayed step, from gathered values (equal on all ranks)."""
        if not voted or self.graph_runner is None:
            return None
        return graph_batch_size(list(gnt), self.graph_runner.batch_sizes)

    def forward(
        self,
        batch: ForwardBatch,
        plan: GatherPlan | None = None,
        hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [rows, vocab] (fp32) of each request's last token, or of every token."""
        return self.forward_with_logprobs(batch, plan, hidden)[0]

    @torch.inference_mode()
    def forward_with_logprobs(
        self,
        batch: ForwardBatch,
        plan: GatherPlan | None = None,
        hidden: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, PromptLogprobs | None]:
        """forward(), plus the prompt logprobs the batch asks for (batch.prompt_logprobs):
        only those rows go through the LM head a second time, vocab-parallel. The last stage's
        entry; `hidden`: the previous stage's rows (forward_hidden), None on a whole model."""
        if not self.stage.last:
            raise ValueError(f"{self._stage_name()} ends before the LM head: call forward_hidden")
        batch = batch.to(self.ps.device)
        plan = plan or self.gather_plan(batch)
        if self.graph_runner is not None and batch.can_run_graph:
            return self.graph_runner.replay(batch, plan), None
        with self._context(batch, plan):
            hidden = self.model(batch.input_ids, batch.positions, self._stage_input(batch, hidden))
            prompt = self._prompt_logprobs(hidden, batch.prompt_logprobs)
            if not batch.return_all_logits and batch.extend_lens:
                last = torch.tensor(batch.extend_lens, device=hidden.device).cumsum(0) - 1
                hidden = hidden[last]
            return self.model.logits(hidden).float(), prompt

    @torch.inference_mode()
    def forward_hidden(
        self,
        batch: ForwardBatch,
        hidden: torch.Tensor | None = None,
        plan: GatherPlan | None = None,
    ) -> torch.Tensor:
        """A stage before the last: this DP group's rows [n, hidden] (model dtype, on the
        device) after the stage's last layer, what the next stage takes as `hidden`. `hidden`:
        the previous stage's rows (None on the first stage, which embeds the batch's ids)."""
        if self.stage.last:
            raise ValueError(f"{self._stage_name()} ends in the LM head: call forward")
        batch = batch.to(self.ps.device)
        with self._context(batch, plan or self.gather_plan(batch)):
            return self.model(batch.input_ids, batch.positions, self._stage_input(batch, hidden))

    @contextmanager
    def _context(self, batch: ForwardBatch, plan: GatherPlan) -> Iterator[None]:
        """The attention metadata and forward context of one eager forward."""
        self.attn_backend.init_forward_metadata(
            batch.req_pool_indices, batch.seq_lens, batch.extend_lens, batch.out_cache_loc
        )
        real_rows = plan.real_rows(batch.input_ids.device) if self.model.has_moe else None
        with forward_context(ForwardContext(plan, self.ps, self.attn_backend, real_rows)):
            yield

    def _stage_input(self, batch: ForwardBatch, hidden: torch.Tensor | None) -> torch.Tensor | None:
        """The rows the model starts from: None (embed the ids) on the first stage, else the
        previous stage's rows, checked against the batch."""
        if self.stage.first:
            if hidden is not None:
                raise ValueError(f"{self._stage_name()} embeds the batch's ids: no hidden rows")
            return None
        want = (batch.num_tokens, int(self.hf_config.hidden_size))
        if hidden is None or tuple(hidden.shape) != want:
            got = None if hidden is None else tuple(hidden.shape)
            raise ValueError(
                f"{self._stage_name()} needs the previous stage's rows {want}, got {got}"
            )
        return hidden.to(self.ps.device, non_blocking=True)

    def _stage_name(self) -> str:
        st = self.stage
        return f"pipeline stage with layers [{st.start}, {st.end})"

    def _prompt_logprobs(
        self, hidden: torch.Tensor, req: PromptLogprobRequest | None
    ) -> PromptLogprobs | None:
        if req is None:
            return None
        head = self.model.lm_head
        logprobs, top_vals, top_ids = vocab_parallel_logprobs(
            self.model.local_logits(hidden[req.rows]).float(),
            head.lo,
            head.vocab_size,
            req.targets,
            req.top_n,
            self.ps.attn_tp,
        )
        top = [list(zip(v, i)) for v, i in zip(top_vals.tolist(), top_ids.tolist())]
        return PromptLogprobs(logprobs.tolist(), top, req.counts)
