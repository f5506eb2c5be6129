"""Which GPU a rank owns, and which collective library each of its groups runs on.

Pure decisions (tested on CPU): the launcher calls them before any rank starts, so a bad
combination fails in one line instead of inside NCCL.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The choice of device and backend (resolve_device, resolve_backend) lives in dpattn.config.


def check_gpus(device: str, backend: str, local_ranks: int, gpus: int | None = None) -> None:
    """Rank processes on CUDA own one GPU each: this host must have one per local rank."""
    if device != "cuda" or backend == "thread":
        return
    gpus = torch.cuda.device_count() if gpus is None else gpus
    if local_ranks > gpus:
        raise ValueError(
            f"{local_ranks} rank processes on this host need {local_ranks} GPUs, found {gpus} "
            "(--backend thread runs all ranks on one GPU)"
        )


def rank_device(device: str, backend: str, local_rank: int) -> torch.device:
    """Rank processes use cuda:<local rank>; threads share the one current GPU."""
    if device == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", 0 if backend == "thread" else local_rank)


@dataclass(frozen=True)
class GroupBackends:
    """The library under each group of a rank (docs/design.md §1).

    `model`: world and attn_tp, which carry the model's tensors (MLP/MoE, DP gather/scatter,
    attention, vocab). `metadata`: world_cpu and attn_tp_cpu, which carry the scheduler's small
    CPU tensors and objects (MLP sync all-gather, request broadcast, KV budget agreement).
    `separate_cpu_groups`: the metadata groups are their own process groups (else the same).
    """

    model: str
    metadata: str
    separate_cpu_groups: bool

    @property
    def capturable(self) -> bool:
        """Whether the model's collectives can be recorded in a CUDA graph (NCCL only)."""
        return self.model == "nccl"


def group_backends(device: str, backend: str) -> GroupBackends:
    if backend == "thread":  # in-process rendezvous, device-generic: one group serves both
        return GroupBackends("thread", "thread", False)
    if device == "cuda":  # SGLang's split: NCCL for tensors on the GPU, gloo for host metadata
        return GroupBackends("nccl", "gloo", True)
    return GroupBackends("gloo", "gloo", False)
