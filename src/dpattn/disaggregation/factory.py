"""The rank loop's scheduler for the engine's disaggregation mode."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dpattn.config import EngineConfig
from dpattn.disaggregation.bootstrap import register_rank
from dpattn.disaggregation.decode import DecodeScheduler, DecodeTimeouts
from dpattn.disaggregation.layout import KVLayout
from dpattn.disaggregation.prefill import PrefillScheduler
from dpattn.disaggregation.prefill_pipeline import PipelinedPrefillScheduler
from dpattn.disaggregation.transfer import FakeDecodeTransfer, FakePrefillTransfer
from dpattn.disaggregation.transfer_zmq_decode import ZmqDecodeTransfer
from dpattn.disaggregation.transfer_zmq_prefill import ZmqPrefillTransfer
from dpattn.executor.model_runner import ModelRunner
from dpattn.scheduler.scheduler import Scheduler


def kv_layout(runner: ModelRunner) -> KVLayout:
    """What this rank's pool looks like to the other side: per-head K and V (the model's KV
    heads), or an MLA model's latent rows (one "head" that every attention-TP rank holds)."""
    pool, hc = runner.kv_pool, runner.hf_config
    dtype = str(pool.k[0].dtype).removeprefix("torch.")
    width, layers = int(pool.k[0].shape[2]), len(pool.k)
    if not runner.stage.is_whole:  # a pipeline stage's pool: the model's layers, all stages'
        layers = int(hc.num_hidden_layers)
    if pool.is_latent:
        rank = int(hc.kv_lora_rank)
        assert 0 < rank < width, f"kv_lora_rank {rank} in a latent row of {width}"
        return KVLayout(1, dtype, width, layers, 1, kind="mla", kv_lora_rank=rank)
    heads = getattr(hc, "num_key_value_heads", None) or hc.num_attention_heads
    return KVLayout(1, dtype, width, layers, int(heads))


def bootstrap_host(cfg: EngineConfig) -> str:
    """Where this server's ranks reach its bootstrap service (the frontend, on node 0)."""
    if cfg.nnodes > 1 and cfg.dist_init_addr:
        return cfg.dist_init_addr.rsplit(":", 1)[0]
    return cfg.disaggregation_host


def build_scheduler(
    cfg: EngineConfig,
    runner: ModelRunner,
    eos_ids: set[int],
    tokenizer: Callable[[], Any] | None = None,
) -> Scheduler:
    mode, fake = cfg.disaggregation_mode, cfg.disaggregation_transfer_backend == "fake"
    if mode == "null":
        return Scheduler(runner, cfg.scheduler, eos_ids, tokenizer)
    ps = runner.ps
    if mode == "prefill":
        if fake:
            sender: Any = FakePrefillTransfer()
        else:
            stage = (runner.stage.start, runner.stage.end)  # the layers this rank's KV holds
            sender = ZmqPrefillTransfer(ps, kv_layout(runner), cfg.disaggregation_host, stage)
            register_rank(bootstrap_host(cfg), cfg.disaggregation_bootstrap_port, sender.info())
        # With stages, the lane's decisions are stage 0's (prefill_pipeline.py).
        kind = PipelinedPrefillScheduler if ps.pp_size > 1 else PrefillScheduler
        return kind(
            runner,
            cfg.scheduler,
            eos_ids,
            tokenizer,
            sender,
            cfg.disaggregation_bootstrap_timeout_s,
        )
    if mode == "decode":
        receiver: Any = (
            FakeDecodeTransfer()
            if fake
            else ZmqDecodeTransfer(
                ps,
                runner.kv_pool,
                kv_layout(runner),
                cfg.disaggregation_host,
                cfg.disaggregation_heartbeat_s,
            )
        )
        timeouts = DecodeTimeouts(
            cfg.disaggregation_bootstrap_timeout_s, cfg.disaggregation_transfer_timeout_s
        )
        return DecodeScheduler(runner, cfg.scheduler, eos_ids, tokenizer, receiver, timeouts)
    raise ValueError(f"unknown disaggregation_mode {mode!r}")
