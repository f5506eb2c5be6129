"""The groups each rank uses (docs/design.md §1, pipeline stages included).

Inside a stage, T = tp_size ranks, D = dp_size DP groups, attention-TP width A = T / D; rank r
of the stage is in DP group r // A with attn_tp rank r % A (dp-major numbering). `world` carries
MLP/MoE collectives and the MLP sync; `attn_tp` carries attention collectives and request
broadcast. Each has a CPU flavour for scheduler metadata (gloo) and a device flavour for tensors
(NCCL on CUDA; the same group on CPU and with the thread backend): see
distributed/device.py:group_backends. With P = pp_size > 1 stages (numbering: layout.py) every
stage has its own `world` and `attn_tp` groups, so a stage's MLP sync and collectives involve
only its T ranks, and `pp` (a PipelineLink) carries activations and results between stages.
At pp_size 1 there is no link and the groups are those of before, built in the same order.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from dpattn.distributed.device import group_backends
from dpattn.distributed.group import Group, TorchGroup, Trace
from dpattn.distributed.layout import Layout
from dpattn.distributed.pipeline import PipelineLink, TorchLink
from dpattn.distributed.shm_group import ShmTorchGroup, open_slots
from dpattn.distributed.thread_backend import ThreadLink, ThreadWorld

__all__ = ["Layout", "ParallelState", "thread_parallel_state", "torch_parallel_state"]


@dataclass
class ParallelState:
    """One rank's view. `rank` is the rank inside its stage (0..T-1: what the model and the
    scheduler index shards and groups by); `global_rank` the engine-wide one. `world` /
    `world_cpu` and `attn_tp` / `attn_tp_cpu` are the stage's groups. At pp_size 1 the two
    ranks coincide and `pp` is None."""

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
    pp_rank: int = 0  # this rank's pipeline stage
    pp: PipelineLink | None = None  # sends and receives between stages (pp_size > 1 only)
    # Collectives across stages over this rank's lane (P ranks; scheduler metadata: the KV
    # pool's min over stages, stage 0's decisions broadcast). pp_size > 1 only.
    pp_group: Group | None = None

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
    def pp_size(self) -> int:
        return self.layout.pp_size

    @property
    def dp_rank(self) -> int:
        return self.layout.dp_rank(self.rank)

    @property
    def attn_tp_rank(self) -> int:
        return self.layout.attn_tp_rank(self.rank)

    @property
    def global_rank(self) -> int:
        return self.layout.global_rank(self.pp_rank, self.rank)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.layout.pp_size - 1

    @property
    def trace(self) -> Trace:
        return self.world.trace

    def set_lockstep(self, on: bool) -> None:
        groups = (self.world, self.attn_tp, self.world_cpu, self.attn_tp_cpu, self.pp_group)
        for g in {id(g): g for g in groups if g is not None}.values():
            g.lockstep = on


def stage_label(layout: Layout, stage: int, name: str) -> str:
    """How errors name a group: its role, with the stage when there are several."""
    return name if layout.pp_size == 1 else f"stage{stage}.{name}"


def thread_parallel_state(
    world: ThreadWorld, layout: Layout, rank: int, device: str | torch.device = "cpu"
) -> ParallelState:
    """The groups of one rank thread (`rank`: global); CPU and device flavours are one group.

    On CUDA every rank thread's tensors live on the same GPU (the rendezvous is device-generic).
    """
    if world.world_size != layout.world_size:
        raise ValueError(f"a world of {world.world_size} threads for {layout.world_size} ranks")
    trace = Trace()
    s, d = layout.stage(rank), layout.dp_rank(rank)
    w = world.group("world", layout.stage_ranks(s), rank, trace, stage_label(layout, s, "world"))
    name = f"attn_tp{d}"
    a = world.group(name, layout.attn_tp_ranks(d, s), rank, trace, stage_label(layout, s, name))
    dev = torch.device(device)
    local = layout.rank_in_stage(rank)
    ps = ParallelState(layout, local, w, a, w, a, dev, layout.world_size, s)
    if layout.pp_size > 1:
        ps.pp = ThreadLink(world, layout, rank, trace, dev)
        lane = layout.lane_ranks(rank)
        ps.pp_group = world.group("pp_group", lane, rank, trace, f"pp_group{local}")
    return ps


def torch_parallel_state(
    layout: Layout,
    rank: int,
    init_method: str | None = None,
    device: str = "cpu",
    timeout_s: float = 60.0,
    local_rank: int | None = None,
    single_host: bool = False,
) -> ParallelState:
    """Initialise torch.distributed for this rank (`rank`: global) and build its groups.

    `init_method` is a tcp:// address; None reads torchrun's environment (MASTER_ADDR, ...).
    With every rank on this host (`single_host`), world_cpu's small all-gathers (the MLP sync)
    go through shared memory (shm_group.py), one mapping per stage.
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
        world_size=layout.world_size,
        timeout=timeout,
        # NCCL: bind the communicator to this GPU now (no lazy init inside a graph capture)
        **({"device_id": dev} if plan.model == "nccl" else {}),
    )
    trace = Trace()
    P = layout.pp_size

    def new_group(ranks: list[int]) -> dist.ProcessGroup:
        pg = dist.new_group(ranks, backend=plan.model, timeout=timeout)
        assert pg is not None
        return pg

    def cpu_group(ranks: list[int]) -> dist.ProcessGroup | None:
        if not plan.separate_cpu_groups:
            return None
        return dist.new_group(ranks, backend=plan.metadata, timeout=timeout)

    # Every rank must create every group, in the same order; at pp_size 1 the order of before
    # (attn_tp groups, then world_cpu; world is the default group).
    stages = range(P)
    tp_groups = {
        (s, d): (new_group(layout.attn_tp_ranks(d, s)), cpu_group(layout.attn_tp_ranks(d, s)))
        for s in stages
        for d in range(layout.dp_size)
    }
    stage_groups = {
        s: (
            dist.group.WORLD if P == 1 else new_group(layout.stage_ranks(s)),
            cpu_group(layout.stage_ranks(s)),
        )
        for s in stages
    }
    lanes = range(layout.tp_size) if P > 1 else range(0)
    lane_groups = {
        r: (new_group(layout.lane_ranks(r)), cpu_group(layout.lane_ranks(r))) for r in lanes
    }

    s, d, r = layout.stage(rank), layout.dp_rank(rank), layout.rank_in_stage(rank)
    world_ranks, tp_ranks = layout.stage_ranks(s), layout.attn_tp_ranks(d, s)
    world_label, tp_name = stage_label(layout, s, "world"), f"attn_tp{d}"
    tp_label = stage_label(layout, s, tp_name)
    world_pg, world_cpu_pg = stage_groups[s]
    tp_pg, tp_cpu_pg = tp_groups[(s, d)]

    def world_group(pg: dist.ProcessGroup) -> TorchGroup:
        if not single_host or layout.tp_size == 1:
            return TorchGroup("world", world_ranks, rank, trace, pg, world_label)
        slots = open_slots(pg, world_ranks, rank, timeout_s)
        return ShmTorchGroup("world", world_ranks, rank, trace, pg, slots, world_label)

    world_cpu = world_group(world_cpu_pg or world_pg)
    # On CPU world and world_cpu are one group (one sequence of collectives for --debug-lockstep)
    world = (
        world_cpu
        if world_cpu_pg is None
        else TorchGroup("world", world_ranks, rank, trace, world_pg, world_label)
    )
    attn_tp = TorchGroup(tp_name, tp_ranks, rank, trace, tp_pg, tp_label)
    attn_tp_cpu = (
        TorchGroup(tp_name, tp_ranks, rank, trace, tp_cpu_pg, tp_label) if tp_cpu_pg else attn_tp
    )
    ps = ParallelState(layout, r, world, attn_tp, world_cpu, attn_tp_cpu, dev, 1, s)
    if P > 1:
        lane_pg, lane_cpu_pg = lane_groups[r]
        lane_cpu_pg = lane_cpu_pg or lane_pg
        ps.pp = TorchLink(layout, rank, trace, timeout_s, dev, lane_pg, lane_cpu_pg)
        lane = layout.lane_ranks(rank)
        ps.pp_group = TorchGroup("pp_group", lane, rank, trace, lane_cpu_pg, f"pp_group{r}")
    return ps
