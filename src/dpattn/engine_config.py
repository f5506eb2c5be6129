"""Engine configuration: options, the rank processes' entry and addresses, follower nodes."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any

from dpattn.distributed.parallel_state import Layout
from dpattn.launch import NodeSpec, RankGroup
from dpattn.model_runner import RunnerConfig
from dpattn.rank_worker import WorkerAddrs, scheduler_main
from dpattn.router import ROUTER_POLICIES
from dpattn.scheduler import SchedulerConfig


@dataclass
class EngineConfig:
    model_path: str
    tp_size: int = 1
    dp_size: int = 1
    backend: str = "gloo"
    router_policy: str = "round_robin"
    collective_timeout_s: float = 60.0
    nnodes: int = 1
    node_rank: int = 0
    # host:port of node 0: the torch rendezvous; ZMQ uses the next ports
    dist_init_addr: str | None = None
    runner: dict[str, Any] = field(default_factory=dict)  # RunnerConfig fields
    scheduler: dict[str, Any] = field(default_factory=dict)  # SchedulerConfig fields

    @classmethod
    def from_options(
        cls, model_path: str, tp_size: int, dp_size: int, **options: Any
    ) -> EngineConfig:
        own = {f.name for f in dataclasses.fields(cls)}
        runner_keys = {f.name for f in dataclasses.fields(RunnerConfig)}
        sched_keys = {f.name for f in dataclasses.fields(SchedulerConfig)}
        cfg = cls(model_path, tp_size, dp_size)
        for key, value in options.items():
            # A key may belong to several configs (max_running_requests sizes the req_to_token
            # table and caps the scheduler's running batch): give it to each that has it.
            known = False
            if key in own:
                setattr(cfg, key, value)
                known = True
            if key in runner_keys:
                cfg.runner[key] = value
                known = True
            if key in sched_keys:
                cfg.scheduler[key] = value
                known = True
            if not known:
                raise TypeError(f"unknown engine option {key!r}")
        if cfg.router_policy not in ROUTER_POLICIES:  # fail before any process starts
            raise ValueError(f"router_policy must be one of {ROUTER_POLICIES}")
        return cfg

    def node(self) -> NodeSpec:
        return NodeSpec(self.nnodes, self.node_rank, self.dist_init_addr)

    def worker_addrs(self, ipc_dir: str) -> WorkerAddrs:
        """Where leaders pull requests and push outputs: IPC on one host, TCP across hosts."""
        d = self.dp_size
        if self.nnodes == 1:
            return WorkerAddrs(
                [f"ipc://{ipc_dir}/req{i}" for i in range(d)], f"ipc://{ipc_dir}/out"
            )
        host, port = self.node().init_method().removeprefix("tcp://").rsplit(":", 1)
        ports = [int(port) + 1 + i for i in range(d + 1)]
        return WorkerAddrs([f"tcp://{host}:{p}" for p in ports[:d]], f"tcp://{host}:{ports[d]}")

    def rank_fn(self, addrs: WorkerAddrs) -> functools.partial[dict[str, Any]]:
        return functools.partial(
            scheduler_main,
            runner_cfg=RunnerConfig(self.model_path, **self.runner),
            sched_cfg=SchedulerConfig(**self.scheduler),
            addrs=addrs,
        )


def bind_addr(addr: str) -> str:
    return f"tcp://*:{addr.rsplit(':', 1)[1]}" if addr.startswith("tcp://") else addr


def run_follower_node(model_path: str, tp_size: int, dp_size: int, **options: Any) -> None:
    """Node 1..N-1 of a multi-node engine: run this host's ranks until node 0 shuts them down."""
    cfg = EngineConfig.from_options(model_path, tp_size, dp_size, **options)
    if cfg.node_rank == 0:
        raise ValueError("node 0 runs the Engine itself")
    fn = cfg.rank_fn(cfg.worker_addrs(""))
    RankGroup(fn, Layout(tp_size, dp_size), "gloo", cfg.collective_timeout_s, cfg.node()).wait()
