"""The CPU rank's memory policy: a step's large blocks stay mapped between steps, and the
kernel caches are bounded."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from dpattn.runtime.host_memory import _glibc

# In a child process: the policy is process-wide. hblkhd = bytes malloc holds in mmap'd blocks.
CHILD = """
import ctypes, sys
import torch
from dpattn.runtime.host_memory import _glibc, keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = _glibc()
libc.mallinfo2.restype = MallInfo2
def mmapped() -> int:
    return libc.mallinfo2().hblkhd

def step() -> int:  # one 'step': a logits-sized block, measured while it is alive
    logits = torch.empty(64, 262144)
    logits.fill_(1.0)
    return mmapped()

base = mmapped()
before = step() - base  # glibc's default: a fresh mmap of the whole block
assert keep_freed_memory() is True
base = mmapped()
after = [step() - base for _ in range(3)]
print(before, after, libc.mallinfo2().fordblks)
assert before >= 64 * 262144 * 4, before
assert after == [0, 0, 0], after  # from the heap, step after step
# ... and freed memory stays in the heap for the next step instead of going back
assert libc.mallinfo2().fordblks >= 64 * 262144 * 4
"""


@pytest.mark.skipif(_glibc() is None, reason="glibc's allocator only")
def test_large_blocks_come_from_the_heap_and_stay_there() -> None:
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# In a child: oneDNN reads the cache sizes once, at its first operation in the process.
KERNELS = """
import sys
import torch
from dpattn.runtime.host_memory import limit_kernel_caches

def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024

if sys.argv[1] == "limit":
    limit_kernel_caches()
w = torch.ops.mkldnn._reorder_linear_weight(torch.randn(64, 32))
before = rss_mb()
for rows in range(1, 201):  # 200 GEMM shapes: oneDNN compiles and caches kernels for each
    torch.ops.mkldnn._linear_pointwise(torch.randn(rows, 32), w, None, "none", [], "")
print(rss_mb() - before)
"""


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch without oneDNN")
def test_kernel_caches_are_bounded() -> None:
    """200 shapes grow a process by ~110 MB of cached kernels by default, ~43 MB when limited
    (64 entries), measured."""

    def growth(mode: str) -> float:
        r = subprocess.run(
            [sys.executable, "-c", KERNELS, mode], capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 0, r.stderr
        return float(r.stdout.split()[-1])

    limited, default = growth("limit"), growth("default")
    assert default > 80, default  # the measurement sees the caches
    assert limited < 60, (limited, default)
