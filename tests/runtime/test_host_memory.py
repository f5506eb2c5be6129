"""The CPU rank's allocator policy: a step's large blocks stay mapped between steps."""

from __future__ import annotations

import subprocess
import sys

import pytest

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
