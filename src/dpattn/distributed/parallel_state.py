"""Topology of one model replica (docs/design.md §1) and the groups each rank uses.

T = tp_size ranks, D = dp_size DP groups, attention-TP width A = T / D. Rank r is in DP group
r // A with attn_tp rank r % A (dp-major numbering). `world` carries MLP/MoE collectives and the
MLP sync; `attn_tp` carries attention collectives and request broadcast. Each has a CPU flavour
for scheduler metadata (gloo) and a device flavour for tensors (NCCL on CUDA; the same group on
CPU and with the thread backend): see distributed/device.py:group_backends.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from dpattn.distributed.device import group_backends
from dpattn.distributed.group import Group, TorchGroup, Trace
from dpattn.distributed.shm_group import ShmTorchGroup, open_slots
from dpattn.distributed.thread_backend import ThreadWorld


@dataclass(frozen=True)
class Layout:
    tp_size: int = 1
    dp_size: int = 1

    def __post_init__(self) -> None:
        if self.tp_size < 1 or self.dp_size < 1 or self.tp_size % self.dp_size:
            raise ValueError(
                f"tp_size {self.tp_size} must be a positive multiple of dp_size {self.dp_size}"
            )

    @property
    def attn_tp_size(self) -> int:
        return self.tp_size // self.dp_size

    def dp_rank(self, rank: int) -> int:
        return rank // self.attn_tp_size

    def attn_tp_rank(self, rank: int) -> int:
        return rank % self.attn_tp_size

    def attn_tp_ranks(self, dp_rank: int) -> list[int]:
        a = self.attn_tp_size
        return list(range(dp_rank * a, (dp_rank + 1) * a))


@dataclass
class ParallelState:
    layout: Layout
    rank: int
    world: Group
    attn_tp: Group
    world_cpu: Group
    attn_tp_cpu: Group
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # Ranks whose tensors share this rank's device memory (thread ranks on one GPU): the KV
    # pool sizing divides the free memory among them.
    ranks_per_device: int = 1

    @property
    def tp_size(self) -> int:
        return self.layout.tp_size

    @property
    def dp_size(self) -> int:
        return self.layout.dp_size

    @property
    def attn_tp_size(self) -> int:
        return self.layout.attn_tp_size

    @property
    def dp_rank(self) -> int:
        return self.layout.dp_rank(self.rank)

    @property
    def attn_tp_rank(self) -> int:
        return self.layout.attn_tp_rank(self.rank)

    @property
    def trace(self) -> Trace:
        return self.world.trace

    def set_lockstep(self, on: bool) -> None:
        for g in {
            id(g): g for g in (self.world, self.attn_tp, self.world_cpu, self.attn_tp_cpu)
        }.values():
            g.lockstep = on


def thread_parallel_state(
    world: ThreadWorld, layout: Layout, rank: int, device: str | torch.device = "cpu"
) -> ParallelState:
    """The groups of one rank thread; CPU and device flavours are the same group.

    On CUDA every rank thread's tensors live on the same GPU (the rendezvous is device-generic).
    """
    trace = Trace()
    d = layout.dp_rank(rank)
    w = world.group("world", list(range(layout.tp_size)), rank, trace)
    a = world.group(f"attn_tp{d}", layout.attn_tp_ranks(d), rank, trace)
    return ParallelState(layout, rank, w, a, w, a, torch.device(device), layout.tp_size)


def torch_parallel_state(
    layout: Layout,
    rank: int,
    init_method: str | None = None,
    device: str = "cpu",
    timeout_s: float = 60.0,
    local_rank: int | None = None,
    single_host: bool = False,
) -> ParallelState:
    """Initialise torch.distributed for this rank and build its groups.

    `init_method` is a tcp:// address; None reads torchrun's environment (MASTER_ADDR, ...).
    With every rank on this host (`single_host`), world_cpu's small all-gathers (the MLP sync)
    go through shared memory (shm_group.py).
    On CUDA the rank owns cuda:<local_rank> (default: LOCAL_RANK, else rank modulo the GPUs);
    the model's groups run on NCCL and the scheduler's metadata groups on gloo (group_backends).
    """
    timeout = datetime.timedelta(seconds=timeout_s)
    plan = group_backends(torch.device(device).type, "nccl" if device != "cpu" else "gloo")
    dev = torch.device("cpu")
    if plan.model == "nccl":
        if local_rank is None:
            local_rank = int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count()))
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    dist.init_process_group(
        plan.model,
        init_method=init_method,
        rank=rank,
        world_size=layout.tp_size,
        timeout=timeout,
        # NCCL: bind the communicator to this GPU now (no lazy init inside a graph capture)
        **({"device_id": dev} if plan.model == "nccl" else {}),
    )
    trace = Trace()
    world_ranks = list(range(layout.tp_size))

    def cpu_group(ranks: list[int]) -> dist.ProcessGroup | None:
        if not plan.separate_cpu_groups:
            return None
        return dist.new_group(ranks, backend=plan.metadata, timeout=timeout)

    # Every rank must create every group, in the same order.
    tp_groups = {
        d: (
            dist.new_group(layout.attn_tp_ranks(d), backend=plan.model, timeout=timeout),
            cpu_group(layout.attn_tp_ranks(d)),
        )
        for d in range(layout.dp_size)
    }
    world_cpu_pg = cpu_group(world_ranks)
    d = layout.dp_rank(rank)
    tp_pg, tp_cpu_pg = tp_groups[d]

    def world_group(pg: dist.ProcessGroup) -> TorchGroup:
        if not single_host or layout.tp_size == 1:
            return TorchGroup("world", world_ranks, rank, trace, pg)
        slots = open_slots(pg, rank, layout.tp_size, timeout_s)
        return ShmTorchGroup("world", world_ranks, rank, trace, pg, slots)

    world_cpu = world_group(world_cpu_pg or dist.group.WORLD)
    # On CPU world and world_cpu are one group (one sequence of collectives for --debug-lockstep)
    world = (
        world_cpu
        if world_cpu_pg is None
        else TorchGroup("world", world_ranks, rank, trace, dist.group.WORLD)
    )
    attn_tp = TorchGroup(f"attn_tp{d}", layout.attn_tp_ranks(d), rank, trace, tp_pg)
    attn_tp_cpu = (
        TorchGroup(f"attn_tp{d}", layout.attn_tp_ranks(d), rank, trace, tp_cpu_pg)
        if tp_cpu_pg
        else attn_tp
    )
    return ParallelState(layout, rank, world, attn_tp, world_cpu, attn_tp_cpu, dev)
