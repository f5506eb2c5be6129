"""Start the ranks of one engine: threads (in-process) or gloo/NCCL processes.

An engine is P = pp_size pipeline stages of T ranks (layout.py): P * T ranks, each started with
its global rank (stage-major). On CUDA a rank process owns cuda:<local rank>; rank threads
share one GPU.
"""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_mod
import signal
import socket
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from dpattn.config import resolve_backend
from dpattn.distributed.device import check_gpus, rank_device
from dpattn.distributed.group import CollectiveError
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
    fn: RankFn,
    layout: Layout,
    rank: int,
    init_method: str,
    timeout_s: float,
    queue: Any,
    device: str = "cpu",
    local_rank: int = 0,
    single_host: bool = True,
) -> None:
    if layout.world_size > 1:
        torch.set_num_threads(1)  # P * T ranks on few cores: default threads oversubscribe them
    # Ctrl-C reaches the whole process group: the parent owns shutdown, ranks must not die
    # mid-collective with a traceback each.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ps = torch_parallel_state(
            layout,
            rank,
            init_method,
            device,
            timeout_s=timeout_s,
            local_rank=local_rank,
            single_host=single_host,
        )
        queue.put((rank, True, fn(ps)))
    except BaseException as e:  # noqa: BLE001 - sent to the parent, which raises it
        queue.put((rank, False, f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@dataclass(frozen=True)
class NodeSpec:
    """Which slice of the P * T ranks this host runs (multi-node: torch.distributed
    rendezvous). Ranks are stage-major, so --nnodes P puts one pipeline stage on each host."""

    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None  # host:port of node 0; None: a free local port
    shm_sync: bool = True  # one host: the MLP sync through shared memory (shm_group.py)

    @property
    def shared_memory(self) -> bool:
        return self.nnodes == 1 and self.shm_sync

    def local_ranks(self, layout: Layout) -> list[int]:
        """This host's global ranks: an equal, contiguous share of the world."""
        n = layout.world_size
        if n % self.nnodes or not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"{n} ranks cannot be spread over {self.nnodes} nodes")
        per = n // self.nnodes
        return list(range(self.node_rank * per, (self.node_rank + 1) * per))

    def init_method(self) -> str:
        if self.dist_init_addr:
            return f"tcp://{self.dist_init_addr}"
        if self.nnodes > 1:
            raise ValueError("--dist-init-addr HOST:PORT is required with --nnodes > 1")
        return f"tcp://127.0.0.1:{free_port()}"


class RankGroup:
    """This host's ranks (all P * T of them on one host). `wait` collects results in global
    rank order (stage 0's T ranks first); a failing rank fails the group."""

    def __init__(
        self,
        fn: RankFn,
        layout: Layout,
        backend: str = "gloo",
        timeout_s: float = 60.0,
        node: NodeSpec | None = None,
        device: str = "cpu",
    ) -> None:
        node = node or NodeSpec()
        self.layout = layout
        self.local_ranks = node.local_ranks(layout)
        self.backend = backend
        self.results: dict[int, Any] = {}
        self.errors: list[str] = []
        self.failed_ranks: set[int] = set()
        self.procs: list[Any] = []
        if backend not in ("thread", "gloo", "nccl"):
            raise ValueError(f"unknown backend {backend!r} (thread | gloo | nccl)")
        resolve_backend(backend, device)  # refuses gloo with CUDA tensors, nccl on CPU
        check_gpus(device, backend, len(self.local_ranks))
        self.device = device
        if backend == "thread":
            if node.nnodes > 1:
                raise ValueError("the thread backend runs on one host")
            self.world = ThreadWorld(layout.world_size, timeout=timeout_s)
            self._thread_error: BaseException | None = None
            self._thread = threading.Thread(target=self._run_threads, args=(fn,), daemon=True)
            self._thread.start()
            return
        ctx = mp.get_context("spawn")
        self.queue = ctx.Queue()
        init = node.init_method()
        self.procs = [
            ctx.Process(
                target=_process_main,
                args=(fn, layout, r, init, timeout_s, self.queue, device, i, node.shared_memory),
                daemon=True,
            )
            for i, r in enumerate(self.local_ranks)
        ]
        for p in self.procs:
            p.start()

    def _run_threads(self, fn: RankFn) -> None:
        try:
            out = run_threads(
                self.world,
                lambda r: fn(
                    thread_parallel_state(
                        self.world, self.layout, r, rank_device(self.device, "thread", 0)
                    )
                ),
            )
            self.results = dict(enumerate(out))
        except BaseException as e:  # noqa: BLE001 - re-raised by wait()
            self._thread_error = e

    def dead_rank(self) -> str | None:
        """A description of the first rank that died or failed, if any."""
        if self.backend == "thread":
            err = self._thread_error
            if self._thread.is_alive() or err is None:
                return None
            rank = getattr(err, "dpattn_rank", None)  # run_threads: which rank raised it
            return str(err) if rank is None else f"{self._rank_name(rank)}: {err}"
        self._drain(0)
        # A rank that vanished without a word is the cause; the others' errors are its echo.
        for r, p in zip(self.local_ranks, self.procs):
            code = p.exitcode
            if code not in (0, None) and r not in self.results and r not in self.failed_ranks:
                how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
                return f"{self._rank_name(r)} died ({how})"
        return self.errors[0] if self.errors else None

    def _rank_name(self, rank: int) -> str:
        """`rank g`, with its stage when there are several."""
        where = f" (stage {self.layout.stage(rank)})" if self.layout.pp_size > 1 else ""
        return f"rank {rank}{where}"

    def _drain(self, timeout: float) -> None:
        try:
            while True:
                rank, ok, value = self.queue.get(timeout=timeout)
                if ok:
                    self.results[rank] = value
                else:
                    self.errors.append(value)
                    self.failed_ranks.add(rank)
                timeout = 0
        except queue_mod.Empty:
            pass

    def wait(self, timeout: float | None = None) -> list[Any]:
        if self.backend == "thread":
            self._thread.join(timeout)
            if self._thread_error is not None:
                raise self._thread_error
            return [self.results[r] for r in range(self.layout.world_size)]
        try:
            while len(self.results) < len(self.local_ranks):
                self._drain(1.0)
                dead = self.dead_rank()
                if dead:
                    raise RuntimeError(dead)
        finally:
            self.terminate(grace=5.0 if not self.errors else 0.5)
        return [self.results[r] for r in self.local_ranks]

    def terminate(self, grace: float = 5.0) -> None:
        if self.backend == "thread":  # threads cannot be killed: fail their next collective
            if self._thread.is_alive() and grace == 0:
                self.world.fail(CollectiveError("the engine stopped this world"))
            return
        for p in self.procs:
            p.join(timeout=grace)
            if p.is_alive():
                p.kill()
                p.join()


def run_ranks(
    fn: RankFn,
    layout: Layout,
    backend: str = "gloo",
    timeout_s: float = 60.0,
    device: str = "cpu",
) -> list[Any]:
    """Run fn(parallel_state) on every rank (P * T); results in global rank order. Any rank
    failing raises."""
    return RankGroup(fn, layout, backend, timeout_s, device=device).wait()


def refuse_in_spawned_child() -> None:
    """A script that creates an Engine at module level re-runs that line in every rank process
    (they are spawned, so they import the main module): say so instead of two tracebacks."""
    if getattr(mp.current_process(), "_inheriting", False):
        raise SystemExit(
            "dpattn: error: the Engine was created while a rank process was starting: rank "
            "processes are spawned and import your script, so create the Engine under "
            '`if __name__ == "__main__":`'
        )
