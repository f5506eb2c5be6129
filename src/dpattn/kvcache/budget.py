"""How many KV slots one rank's pool gets: a fixed `--max-total-tokens`, or a fraction of the
memory left after the weights (`--mem-fraction-static`, SGLang-style).

The rank measures memory after loading its weights: free device memory on a GPU, the host's
available memory on CPU (shared by every rank on the host, so it is split between them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

# CPU memory is shared with everything else on the host, so by default take less of it.
DEFAULT_MEM_FRACTION = {"cuda": 0.85, "cpu": 0.3}


@dataclass(frozen=True)
class KVBudget:
    tokens: int  # slots of this rank's pool
    bytes_per_token: int  # K and V (or the MLA latent) of every layer, this rank's KV heads
    source: str  # how the size was chosen, for the start-up log


def bytes_per_token(
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    v_head_dim: int | None = None,
) -> int:
    """KV bytes of one token on one rank (`v_head_dim` 0: an MLA latent row, no V)."""
    v = head_dim if v_head_dim is None else v_head_dim
    return num_layers * num_kv_heads * (head_dim + v) * torch.empty(0, dtype=dtype).element_size()


def available_memory(device: torch.device) -> int:
    """Bytes this process may still allocate on `device` (free GPU memory; host MemAvailable)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def kv_budget(
    max_total_tokens: int | None,
    mem_fraction_static: float | None,
    per_token: int,
    device: torch.device,
    ranks_sharing_memory: int,
    useful_tokens: int,
) -> KVBudget:
    """The pool size: the fixed one, else fraction x available / sharing ranks, capped at
    `useful_tokens` (every running request at full context: more could never be used)."""
    if max_total_tokens is not None:
        if max_total_tokens < 2:
            raise ValueError(f"max_total_tokens must be >= 2 (got {max_total_tokens})")
        return KVBudget(max_total_tokens, per_token, "--max-total-tokens")
    fraction = mem_fraction_static
    if fraction is None:
        fraction = DEFAULT_MEM_FRACTION.get(device.type, DEFAULT_MEM_FRACTION["cpu"])
    if not 0 < fraction <= 1:
        raise ValueError(f"mem_fraction_static must be in (0, 1] (got {fraction})")
    free = available_memory(device)
    tokens = int(fraction * free / max(1, ranks_sharing_memory) / per_token)
    source = (
        f"mem_fraction_static={fraction} of {free / 2**30:.1f} GiB available"
        f" / {ranks_sharing_memory} rank(s)"
    )
    if tokens > useful_tokens:
        tokens, source = useful_tokens, f"{source}, capped at max_running_requests x context"
    if tokens < 2:
        raise ValueError(
            f"no memory left for the KV cache: {free / 2**20:.0f} MiB available, "
            f"{per_token} bytes per token; lower the model size or set --max-total-tokens"
        )
    return KVBudget(tokens, per_token, source)
