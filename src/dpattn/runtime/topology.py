"""The process topology of one engine, started from one function: `start_ranks`.

Node 0 runs the frontend (Engine) and its share of the ranks; nodes 1..N-1 run only theirs
(`run_follower_node`). Each DP group's attn_tp leader pulls requests from its own socket and
pushes outputs to the frontend's: IPC on one host, TCP across hosts. With pipeline stages the
ranks are P * T, stage-major (--nnodes P: a stage per host); the frontend's sockets stay one per
DP group, for stage 0's leaders.
"""

from __future__ import annotations

import functools
from typing import Any

from dpattn.config import EngineConfig
from dpattn.distributed.parallel_state import Layout
from dpattn.models.registry import model_stages
from dpattn.runtime.launch import NodeSpec, RankGroup
from dpattn.runtime.rank_worker import WorkerAddrs, scheduler_main


def node_spec(cfg: EngineConfig) -> NodeSpec:
    return NodeSpec(cfg.nnodes, cfg.node_rank, cfg.dist_init_addr, not cfg.disable_shm_sync)


def check_pipeline(cfg: EngineConfig) -> None:
    """--pp-size and --pp-layer-partition against the model, before any rank starts (a user
    error: StagePartitionError / ValueError, one line, exit 2 on the command line)."""
    runner = cfg.runner
    if cfg.pp_size == 1 and runner.pp_layer_partition is None:
        return
    model_stages(cfg.model_path, cfg.pp_size, runner.pp_layer_partition)
    if cfg.pp_size > 1 and cfg.disaggregation_mode == "decode":
        # A decode server's ranks receive every layer's KV cache from the prefill side, which
        # knows nothing of stages.
        raise ValueError("--pp-size > 1 does not run a --disaggregation-mode decode server yet")


def worker_addrs(cfg: EngineConfig, ipc_dir: str) -> WorkerAddrs:
    """Where leaders pull requests and push outputs: IPC on one host, TCP across hosts."""
    d = cfg.dp_size
    if cfg.nnodes == 1:
        return WorkerAddrs([f"ipc://{ipc_dir}/req{i}" for i in range(d)], f"ipc://{ipc_dir}/out")
    host, port = node_spec(cfg).init_method().removeprefix("tcp://").rsplit(":", 1)
    ports = [int(port) + 1 + i for i in range(d + 1)]
    return WorkerAddrs([f"tcp://{host}:{p}" for p in ports[:d]], f"tcp://{host}:{ports[d]}")


def start_ranks(cfg: EngineConfig, addrs: WorkerAddrs) -> RankGroup:
    """This host's ranks, each running the scheduler loop (threads, or gloo / NCCL processes)."""
    fn = functools.partial(scheduler_main, cfg=cfg, addrs=addrs)
    layout = Layout(cfg.tp_size, cfg.dp_size, cfg.pp_size)
    assert cfg.backend is not None and cfg.device is not None  # EngineConfig.from_options
    return RankGroup(
        fn, layout, cfg.backend, cfg.collective_timeout_s, node_spec(cfg), device=cfg.device
    )


def bind_addr(addr: str) -> str:
    return f"tcp://*:{addr.rsplit(':', 1)[1]}" if addr.startswith("tcp://") else addr


def run_follower_node(model_path: str, tp_size: int, dp_size: int, **options: Any) -> None:
    """Node 1..N-1 of a multi-node engine: run this host's ranks until node 0 shuts them down."""
    cfg = EngineConfig.from_options(model_path, tp_size, dp_size, **options)
    if cfg.node_rank == 0:
        raise ValueError("node 0 runs the Engine itself")
    if cfg.backend == "thread":
        raise ValueError("multi-node runs rank processes (gloo or nccl), not threads")
    check_pipeline(cfg)
    start_ranks(cfg, worker_addrs(cfg, "")).wait()
