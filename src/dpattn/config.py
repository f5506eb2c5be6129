"""Every option of the engine and of its ranks' model runner and scheduler, in one module.

A field exposed on the command line carries its flag in the field metadata (`option`);
cli_parser.py builds the parsers from these, so every flag is spelled once, here. This module
imports nothing from dpattn: every part of the system may read its own config without import
cycles.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

# DP routing (--load-balance-method). follow_bootstrap_room (SGLang's name): a disaggregated
# request's group is bootstrap_room % dp (what a prefill server always does).
ROUTER_POLICIES = (
    "round_robin",
    "shortest_queue",
    "minimum_tokens",
    "cache_aware",
    "follow_bootstrap_room",
)
# SGLang's other --load-balance-method values, mapped onto dpattn's (auto: by the server's role).
SGLANG_LOAD_BALANCE = {"total_requests": "shortest_queue", "total_tokens": "minimum_tokens"}
LOAD_BALANCE_METHODS = (*ROUTER_POLICIES, "auto", *SGLANG_LOAD_BALANCE)
SCHEDULE_POLICIES = ("fcfs", "lpm")
GRAMMAR_BACKENDS = ("xgrammar", "none")
BACKENDS = ("gloo", "nccl", "thread")  # gloo / nccl: one process per rank
DEVICES = ("cpu", "cuda")
DISAGGREGATION_MODES = ("null", "prefill", "decode")
TRANSFER_BACKENDS = ("zmq", "fake")

# Flag groups: "layout" flags are taken by every command that runs a model (verify included);
# "engine" flags by the commands that start an Engine (generate, bench, serve).
LAYOUT, ENGINE = "layout", "engine"


def option(
    default: Any,
    help: str,
    *,
    group: str = ENGINE,
    flags: tuple[str, ...] = (),
    choices: tuple[Any, ...] | None = None,
) -> Any:
    """A config field with a command-line flag (default: --field-name)."""
    meta = {"help": help, "group": group, "flags": flags, "choices": choices}
    return field(default=default, metadata=meta)


@dataclass
class RunnerConfig:
    """The model runner of one rank: weights, dtype, parallel layout of the MLP, KV memory."""

    model_path: str
    dtype: str = option(
        "float32", "model dtype", group=LAYOUT, choices=("float32", "bfloat16", "float16")
    )
    ep: bool = option(
        False, "expert parallelism: whole experts per rank (ep_size = tp_size)", group=LAYOUT
    )
    moe_dense_tp_size: int | None = option(
        None, "1: scattered layout for dense MLP layers", group=LAYOUT, choices=(1,)
    )
    dp_padding_mode: str = option(
        "auto",
        "DP gather padding (auto: SUM_LEN when a group extends, else the cheaper)",
        group=LAYOUT,
        choices=("auto", "max_len", "sum_len"),
    )
    mla_mode: str = option(
        "auto",
        "MLA models: absorbed (multi-query over the latent cache), decompressed (per-head K/V "
        "from kv_b_proj), auto: decompressed for a batch without decodes, else absorbed",
        group=LAYOUT,
        choices=("auto", "absorbed", "decompressed"),
    )
    # None: the even split of distributed/layout.py's layer_partition (SGLang's name and rule).
    pp_layer_partition: list[int] | None = option(
        None,
        "decoder layers per pipeline stage, comma-separated, stage 0 first (default: an even "
        "split, the layers left over to the stages before the last)",
        group=LAYOUT,
    )
    # None: the checkpoint's own (models/quantized.py: gguf for a GGUF model, fp8 for an FP8
    # checkpoint, else none), resolved before any rank starts.
    quantization: str | None = option(
        None,
        "weight format (layers/quant.py): none (as loaded, the reference), gguf (a GGUF "
        "model's own integer weights), int8 / int4 (weight-only, quantized at load per "
        "--quant-group-size inputs), fp8 (block-wise checkpoints, dequantized at load); "
        "default: the checkpoint's own",
        group=LAYOUT,
        choices=("none", "gguf", "int8", "int4", "fp8"),
    )
    quant_group_size: int = option(
        128, "int8 / int4: inputs per scale", group=LAYOUT, choices=(32, 64, 128, 256)
    )
    quant_batch_path: str = option(
        "dequantize",
        "integer weights, batches of more than a few rows (CPU): dequantize row blocks each "
        "step (the quantized bytes only), or dense: keep an fp32 prepacked copy beside the "
        "packed weight (faster at batch, fp32's memory more)",
        group=LAYOUT,
        choices=("dequantize", "dense"),
    )
    # None: sized from memory (kvcache/budget.py); SGLang's flag name, the old one kept too.
    kv_pool_tokens: int | None = option(
        None,
        "KV cache slots per rank (default: --mem-fraction-static of the memory left)",
        flags=("--max-total-tokens",),
    )
    mem_fraction_static: float | None = option(
        None, "fraction of the memory left after the weights the KV pool takes (0.85 GPU, 0.3 CPU)"
    )
    # Rows of the request-to-token table; the engine sets it to the scheduler's cap.
    max_running_requests: int = 32
    context_length: int | None = option(
        None, "tokens per request, prompt + output (default: min(model context, KV pool))"
    )
    # CUDA graphs of decode steps (executor/cuda_graph_runner.py); CUDA with NCCL ranks only.
    cuda_graph_max_bs: int = option(32, "largest decode batch per DP group captured as a graph")
    cuda_graph_max_seq_len: int = option(
        4096, "longest sequence a captured decode graph attends over (longer: eager)"
    )
    disable_cuda_graph: bool = option(False, "run every decode step eagerly (no CUDA graphs)")
    disable_weight_prepack: bool = option(
        False, "CPU: keep projection weights plain (no oneDNN prepacking; see layers/linear.py)"
    )


@dataclass
class SchedulerConfig:
    """The scheduler of one rank: continuous batching limits and the MLP sync."""

    chunked_prefill_size: int = option(256, "prefill tokens per step and DP group")
    max_running_requests: int = option(128, "requests a DP group runs at once")
    skip_all_gather: bool | None = None  # None: skip iff dp_size == 1
    debug_lockstep: bool = option(
        False, "ranks check every collective's (op, shape) before running it"
    )
    disable_radix_cache: bool = option(False, "no prefix cache: every prompt is computed whole")
    page_size: int = option(1, "tokens per prefix-cache page (matches are whole pages)")
    schedule_policy: str = option(
        "fcfs",
        "waiting-queue order: fcfs, or lpm (longest cached prefix first)",
        choices=SCHEDULE_POLICIES,
    )
    grammar_backend: str = option(
        "xgrammar",
        "constrained decoding (json_schema / regex / ebnf): xgrammar, or none (such requests "
        "fail with a 400)",
        choices=GRAMMAR_BACKENDS,
    )
    grammar_compile_timeout: float = option(
        30.0, "seconds a request waits for its grammar to compile before it fails (400)"
    )


@dataclass
class EngineConfig:
    """The whole engine: layout, process backend, routing, multi-node, and the rank configs."""

    model_path: str
    tp_size: int = option(1, "ranks of one model replica (T)", group=LAYOUT, flags=("--tp",))
    dp_size: int = option(1, "DP attention groups (D); A = T / D", group=LAYOUT, flags=("--dp",))
    # SGLang's name. World = P * T ranks, stage-major (docs/design.md §1, pipeline stages).
    pp_size: int = option(
        1, "pipeline stages (P), each a full --tp / --dp layout of its own", group=LAYOUT
    )
    # None: resolved by from_options (resolve_device, resolve_backend), before any rank starts.
    device: str | None = option(
        None,
        "cpu or cuda (default: $DPATTN_DEVICE, else cuda when available); on cuda each rank "
        "owns cuda:<local rank>",
        group=LAYOUT,
        choices=DEVICES,
    )
    backend: str | None = option(
        None,
        "rank processes (nccl on cuda, gloo on cpu: the default) or in-process threads "
        "(on cuda: all ranks on one GPU)",
        group=LAYOUT,
        choices=BACKENDS,
    )
    router_policy: str = option(
        "auto",
        "DP router policy (auto, SGLang's default: follow_bootstrap_room on a prefill server, "
        "else round_robin; cache_aware: the group holding the longest prefix, unless loaded; "
        "follow_bootstrap_room: bootstrap_room %% dp, disaggregated servers only, what a prefill "
        "server always does; SGLang's auto, total_requests, total_tokens map to round_robin or "
        "follow_bootstrap_room, shortest_queue, minimum_tokens)",
        choices=LOAD_BALANCE_METHODS,
        flags=("--load-balance-method",),  # SGLang's name; --router-policy is kept too
    )
    collective_timeout_s: float = option(
        60.0, "seconds before a stuck collective fails", flags=("--collective-timeout",)
    )
    nnodes: int = option(
        1, "hosts the P * T ranks are spread over (--nnodes P: one pipeline stage per host)"
    )
    node_rank: int = option(0, "this host's index (0 runs the engine)")
    # host:port of node 0: the torch rendezvous; ZMQ uses the next ports
    dist_init_addr: str | None = option(None, "HOST:PORT of node 0 for the rendezvous")
    disable_shm_sync: bool = option(
        False, "MLP sync over gloo even with every rank on this host (default: shared memory)"
    )
    # The CLI's --log-level (dpattn.logs), for the ranks too; a rank logs its DP group's step
    # line every log_interval decode steps at info level (as SGLang's decode log interval).
    log_level: str = "info"
    log_interval: int = 40
    # Prefill/decode disaggregation (dpattn/disaggregation/; SGLang's flag names).
    disaggregation_mode: str = option(
        "null",
        "prefill/decode disaggregation: null (colocated), prefill or decode server",
        choices=DISAGGREGATION_MODES,
    )
    disaggregation_transfer_backend: str = option(
        "zmq",
        "KV transfer (fake: moves nothing; warm-up, decode-only bench)",
        choices=TRANSFER_BACKENDS,
    )
    disaggregation_bootstrap_port: int = option(
        8998,
        "prefill server: port of the bootstrap service its ranks register with; either server: "
        "the port a request's bootstrap_port null stands for (SGLang's router sends null for a "
        "prefill server given without one)",
    )
    disaggregation_host: str = option(
        "127.0.0.1", "address of the KV transfer and the prefill's bootstrap service"
    )
    disaggregation_bootstrap_timeout_s: float = option(
        60.0,
        "seconds a request may wait for the other side's handshake",
        flags=("--disaggregation-bootstrap-timeout",),
    )
    disaggregation_transfer_timeout_s: float = option(
        120.0,
        "seconds a decode request may wait for its KV cache",
        flags=("--disaggregation-transfer-timeout",),
    )
    disaggregation_heartbeat_s: float = option(
        1.0, "decode server: seconds between checks that its prefill servers live"
    )
    # Tests only: a fault a rank injects on purpose (runtime.faults); never set in production.
    fault: Any = None
    runner: RunnerConfig = field(default_factory=lambda: RunnerConfig(""))
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    @classmethod
    def from_options(
        cls, model_path: str, tp_size: int = 1, dp_size: int = 1, **options: Any
    ) -> EngineConfig:
        """Options by field name, each given to every config that has it."""
        cfg = cls(model_path, tp_size, dp_size)
        cfg.runner.model_path = model_path
        for key, value in options.items():
            targets = [c for c in (cfg, cfg.runner, cfg.scheduler) if _has_field(c, key)]
            if not targets or key in ("runner", "scheduler", "model_path"):
                raise TypeError(f"unknown engine option {key!r}")
            for target in targets:
                setattr(target, key, value)
        # The request table has a row for every request the scheduler may run (default too).
        cfg.runner.max_running_requests = cfg.scheduler.max_running_requests
        if cfg.disaggregation_mode not in DISAGGREGATION_MODES:
            raise ValueError(f"disaggregation_mode must be one of {DISAGGREGATION_MODES}")
        # fail before any process starts
        cfg.router_policy = resolve_router_policy(cfg.router_policy, cfg.disaggregation_mode)
        if cfg.disaggregation_transfer_backend not in TRANSFER_BACKENDS:
            raise ValueError(f"disaggregation_transfer_backend must be one of {TRANSFER_BACKENDS}")
        if cfg.backend is not None and cfg.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}")
        cfg.device = resolve_device(cfg.device)
        cfg.backend = resolve_backend(cfg.backend, cfg.device)
        return cfg


def resolve_router_policy(method: str, disaggregation_mode: str) -> str:
    """`--load-balance-method`: dpattn's policies, and SGLang's names for them."""
    if method == "auto":  # SGLang's default: by the server's role
        return "follow_bootstrap_room" if disaggregation_mode == "prefill" else "round_robin"
    method = SGLANG_LOAD_BALANCE.get(method, method)
    if method not in ROUTER_POLICIES:
        raise ValueError(
            f"--load-balance-method {method!r} is not one dpattn has: use one of "
            f"{', '.join(ROUTER_POLICIES)} (or SGLang's auto, total_requests = shortest_queue, "
            "total_tokens = minimum_tokens)"
        )
    if method == "follow_bootstrap_room" and disaggregation_mode == "null":
        raise ValueError(
            "--load-balance-method follow_bootstrap_room routes a disaggregated request by its "
            "bootstrap_room: it needs --disaggregation-mode prefill or decode"
        )
    return method


def resolve_device(requested: str | None, has_cuda: bool | None = None) -> str:
    """`--device`: cuda when available unless asked otherwise; cuda without CUDA is an error.

    Not given, $DPATTN_DEVICE decides when set (the CPU test suite pins cpu with it, so that a
    GPU host runs it as it runs in CI)."""
    if requested is None:
        requested = os.environ.get("DPATTN_DEVICE") or None
    if has_cuda is None:
        import torch  # here, not at the top: reading a config needs no torch

        has_cuda = torch.cuda.is_available()
    if requested is None:
        return "cuda" if has_cuda else "cpu"
    if requested not in DEVICES:
        raise ValueError(f"--device must be one of {DEVICES}, got {requested!r}")
    if requested == "cuda" and not has_cuda:
        raise ValueError("--device cuda: torch sees no CUDA device here; use --device cpu")
    return requested


def resolve_backend(requested: str | None, device: str) -> str:
    """`--backend`: rank processes on NCCL (cuda) or gloo (cpu) by default, or threads."""
    if requested is None:
        return "nccl" if device == "cuda" else "gloo"
    if requested == "nccl" and device != "cuda":
        raise ValueError("--backend nccl needs --device cuda (CPU ranks use gloo)")
    if requested == "gloo" and device == "cuda":  # gloo cannot reduce-scatter CUDA tensors
        raise ValueError(
            "--backend gloo cannot carry CUDA tensors: use --backend nccl (one GPU per rank), "
            "--backend thread (all ranks on one GPU) or --device cpu"
        )
    return requested


def _has_field(obj: Any, name: str) -> bool:
    return any(f.name == name for f in dataclasses.fields(obj))


def flag_fields(group: str) -> list[dataclasses.Field[Any]]:
    """The fields of every config that have a flag in `group`, in declaration order."""
    out = []
    for cls in (EngineConfig, RunnerConfig, SchedulerConfig):
        out += [f for f in dataclasses.fields(cls) if f.metadata.get("group") == group]
    return out
