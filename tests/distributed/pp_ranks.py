"""Start P * T gloo rank processes, each with its pipeline stage's groups (tests only).

runtime/launch.py starts the T ranks of one stage; until the engine runs pipelines this helper
starts a whole pipelined world for the distributed layer's tests.
"""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_mod
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from dpattn.distributed.layout import Layout
from dpattn.distributed.parallel_state import ParallelState, torch_parallel_state
from dpattn.runtime.launch import free_port


def _rank_main(
    fn: Callable[[ParallelState], Any],
    layout: Layout,
    rank: int,
    init_method: str,
    timeout_s: float,
    results: Any,
) -> None:
    torch.set_num_threads(1)  # P * T ranks on 2 cores
    try:
        ps = torch_parallel_state(layout, rank, init_method, "cpu", timeout_s, single_host=True)
        results.put((rank, True, fn(ps)))
    except BaseException as e:  # noqa: BLE001 - sent to the parent, which raises it
        results.put(
            (rank, False, f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
        )
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_gloo(
    fn: Callable[[ParallelState], Any], layout: Layout, timeout_s: float = 60.0
) -> list[Any]:
    """fn(parallel_state) on every global rank; results in rank order. A failing rank raises."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    init = f"tcp://127.0.0.1:{free_port()}"
    procs = [
        ctx.Process(target=_rank_main, args=(fn, layout, g, init, timeout_s, results), daemon=True)
        for g in range(layout.world_size)
    ]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    deadline = time.monotonic() + 4 * timeout_s
    try:
        while len(out) < len(procs):
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue_mod.Empty:
                dead = [g for g, p in enumerate(procs) if p.exitcode not in (0, None)]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"ranks {dead} died" if dead else "no result in time"
                    ) from None
                continue
            if not ok:
                raise RuntimeError(value)
            out[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5.0)
            if p.is_alive():
                p.kill()
                p.join()
    return [out[g] for g in range(layout.world_size)]
