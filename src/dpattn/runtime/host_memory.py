"""The host memory policy of a CPU rank process: freed memory is kept for the next step, and
oneDNN's kernel caches are bounded.

glibc serves every allocation over 32 MiB (the most its mmap threshold can be raised to) with a
fresh mmap and unmaps it on free. A decode step's logits are such a block (Gemma 3 270M at
batch 64: 64 x 262144 fp32 = 67 MB), so every step page-faults and zeroes them again while the
LM head writes them: 20 ms of a 300 ms step (head GEMM 172-176 -> 152-156 ms, 2 cores).
Serving large blocks from the heap and not trimming it keeps that memory mapped from one step
to the next, as tcmalloc or jemalloc would.

Applied after the model is loaded, so loading's one-off copies still go back to the system.
It covers the main thread's arena, where a rank process runs its loop: another thread's arena
still maps blocks over 64 MiB afresh (rank threads, `--backend thread`, are not changed).
Measured in a rank process at batch 64: 15,944 page faults a step before, 995 after.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Iterator
from contextlib import contextmanager

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

# Freed memory at the top of the heap beyond this goes back to the system. A step's transient
# working set (logits, activations) is far below it; mallopt takes an int.
KEEP_FREED_BYTES = 1 << 30


# oneDNN JIT-compiles each GEMM shape (weight, rows) into kernels of about 0.6 MB, kept in its
# primitive cache and in ideep's (1,024 entries each by default: up to ~620 MB a rank). The
# packed GEMMs run on a bounded set of row counts (linear.packed_rows); 64 entries bound the
# kernels to ~50 MB (measured: 400 row counts grew a process by 220 MB, by 48 MB at 64) at ~1 ms
# per shape compiled again after eviction. A decode step's shapes repeat, so it stays cached.
KERNEL_CACHE_ENTRIES = 64
KERNEL_CACHE_VARS = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def limit_kernel_caches(entries: int = KERNEL_CACHE_ENTRIES) -> None:
    """Bound oneDNN's and ideep's kernel caches, unless the environment already sets them. They
    read these once, when first used: call before the process's first oneDNN operation."""
    for var in KERNEL_CACHE_VARS:
        os.environ.setdefault(var, str(entries))


@contextmanager
def rank_memory_policy(enabled: bool) -> Iterator[None]:
    """Around a CPU rank process's model loading: the kernel caches are bounded before its
    first oneDNN operation, freed memory is kept once loading's copies are gone. Off (`enabled`
    False) where the rank does not own its process (`--backend thread`) or runs on a GPU."""
    if enabled:
        limit_kernel_caches()
    yield
    if enabled:
        release_freed_memory()  # loading's transients (packing weights: many 10-40 MB blocks)
        keep_freed_memory()


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name)
    # musl and macOS have no gnu_get_libc_version, nor these mallopt parameters
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def release_freed_memory() -> None:
    """Give the heap's freed memory back to the system (glibc's malloc_trim)."""
    libc = _glibc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def keep_freed_memory(keep_bytes: int = KEEP_FREED_BYTES) -> bool:
    """Serve large allocations from the heap and keep up to `keep_bytes` of freed memory
    mapped (process-wide). False where the C library is not glibc: nothing is changed."""
    libc = _glibc()
    if libc is None:
        return False
    # mallopt returns 1 on success; both must hold, else big blocks are trimmed on free.
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, keep_bytes))


def status_bytes(field: str, pid: int | str = "self") -> int | None:
    """A memory field of /proc/PID/status (VmRSS: resident now, VmHWM: its peak) in bytes; None
    where /proc is missing or the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def resident_bytes() -> int:
    """This process's resident memory now, 0 where /proc is missing."""
    return status_bytes("VmRSS") or 0
