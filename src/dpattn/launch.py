"""Start the T ranks of one model replica: threads (in-process) or gloo/NCCL processes."""

from __future__ import annotations

import multiprocessing as mp
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch

from dpattn.distributed.parallel_state import (
    Layout,
    ParallelState,
    thread_parallel_state,
    torch_parallel_state,
)
from dpattn.distributed.thread_backend import ThreadWorld, run_threads

RankFn = Callable[[ParallelState], Any]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _process_main(
    fn: RankFn, layout: Layout, rank: int, init_method: str, timeout_s: float, queue: Any
) -> None:
    if layout.tp_size > 1:
        torch.set_num_threads(1)  # T ranks on few cores: default threads oversubscribe them
    try:
        ps = torch_parallel_state(layout, rank, init_method, timeout_s=timeout_s)
        queue.put((rank, True, fn(ps)))
    except BaseException as e:  # noqa: BLE001 - sent to the parent, which raises it
        queue.put((rank, False, f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_ranks(
    fn: RankFn, layout: Layout, backend: str = "gloo", timeout_s: float = 60.0
) -> list[Any]:
    """Run fn(parallel_state) on every rank; results in rank order. Any rank failing raises."""
    if backend == "thread":
        world = ThreadWorld(layout.tp_size, timeout=timeout_s)
        return run_threads(world, lambda r: fn(thread_parallel_state(world, layout, r)))
    if backend != "gloo":
        raise ValueError(f"unknown backend {backend!r} (thread | gloo)")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    init = f"tcp://127.0.0.1:{free_port()}"
    procs = [
        ctx.Process(target=_process_main, args=(fn, layout, r, init, timeout_s, queue), daemon=True)
        for r in range(layout.tp_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        while len(results) + len(errors) < layout.tp_size:
            try:
                rank, ok, value = queue.get(timeout=1.0)
            except Exception:  # queue.Empty: check for ranks that died without reporting
                dead = [
                    r
                    for r, p in enumerate(procs)
                    if not p.is_alive() and p.exitcode not in (0, None)
                ]
                dead = [r for r in dead if r not in results]
                if dead:
                    raise RuntimeError(
                        f"rank {dead[0]} died (exit code {procs[dead[0]].exitcode})"
                        + (f"; earlier: {errors[0]}" if errors else "")
                    ) from None
                continue
            (results.__setitem__(rank, value) if ok else errors.append(value))
            if errors:  # one failed rank: the rest are stuck or failing; stop them now
                break
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RuntimeError(errors[0])
    return [results[r] for r in range(layout.tp_size)]
