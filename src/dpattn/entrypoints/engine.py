"""Offline engine: starts the rank processes, routes requests to DP groups, collects outputs.

This module holds the Engine's processes, sockets and lifecycle (start, readiness, health
watchdog, shutdown); the request side (submit ... generate, the output reader, the KV
accounting) is EngineRequests in engine_requests.py, which Engine inherits."""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq

from dpattn.config import EngineConfig
from dpattn.disaggregation.frontend import start_bootstrap
from dpattn.distributed.parallel_state import Layout
from dpattn.entrypoints.engine_requests import EngineRequests
from dpattn.entrypoints.request_state import Delta, RequestState
from dpattn.entrypoints.validation import RequestLimits
from dpattn.messages import RankReady, Shutdown, StepStats
from dpattn.models.model_path import resolve_model_path
from dpattn.models.quantized import resolve_quantization
from dpattn.runtime.launch import refuse_in_spawned_child
from dpattn.runtime.rank_worker import load_tokenizer
from dpattn.runtime.router import DpRouter
from dpattn.runtime.topology import bind_addr, check_pipeline, start_ranks, worker_addrs

__all__ = ["Delta", "Engine"]

log = logging.getLogger(__name__)


class Engine(EngineRequests):
    def __init__(
        self, model_path: str | None = None, tp_size: int = 1, dp_size: int = 1, **options: Any
    ) -> None:
        refuse_in_spawned_child()
        model_path = resolve_model_path(model_path)  # None: the one default model
        self.cfg = EngineConfig.from_options(model_path, tp_size, dp_size, **options)
        runner = self.cfg.runner  # a --quantization the checkpoint cannot take fails here
        runner.quantization = resolve_quantization(model_path, runner.quantization)
        check_pipeline(self.cfg)  # --pp-size / --pp-layer-partition vs the model's layers
        # P * T ranks; the frontend talks to stage 0's DP group leaders only.
        self.layout = Layout(tp_size, dp_size, self.cfg.pp_size)
        self.tokenizer = load_tokenizer(model_path)
        # The effective limits, as the ranks report them (RankReady): set by _wait_ready.
        self.context_length = 0
        self.limits: RequestLimits | None = None
        self.kv_source = ""
        self.kv_bytes_per_token = 0  # KV bytes one token costs one rank (its share of the heads)
        self.weight_bytes = self.rss_bytes = 0  # a DP group leader's, as it reported them
        self._zmq = zmq.Context()
        if self.cfg.node_rank != 0:
            raise ValueError("the Engine runs on node 0; other nodes use run_follower_node")
        self._dir = tempfile.mkdtemp(prefix="dpattn-")
        addrs = worker_addrs(self.cfg, self._dir)
        self._req_socks = []
        for a in addrs.requests:
            s = self._zmq.socket(zmq.PUSH)
            s.setsockopt(zmq.SNDTIMEO, 10_000)  # a leader that went away must not block us forever
            s.bind(bind_addr(a))
            self._req_socks.append(s)
        self._out_sock = self._zmq.socket(zmq.PULL)
        self._out_sock.bind(bind_addr(addrs.outputs))
        self._lock = threading.Lock()
        self._pending: dict[str, RequestState] = {}
        self._abandoned: set[str] = set()  # timed out: forgotten once the abort's last delta came
        self.router = DpRouter(self.cfg.router_policy, dp_size)
        # (dp_rank, StepStats) of recent steps, and callbacks for every step (metrics).
        self.step_stats: deque[tuple[int, StepStats]] = deque(maxlen=100_000)
        self.step_listeners: list[Callable[[int, StepStats, int], None]] = []
        self.kv_free: list[int] = [0] * dp_size
        self.kv_total: list[int] = [0] * dp_size
        self.flushes: list[int] = [0] * dp_size  # FlushCache messages each group carried out
        self.kv_cached: list[int] = [0] * dp_size  # slots in each group's prefix cache
        # The most KV slots requests held at once, summed over the DP groups (each group's
        # latest report); reset_kv_peak() starts a new measurement.
        self.kv_used_peak = 0
        self.retractions: list[int] = [0] * dp_size  # requests each group sent back to wait
        # Disaggregated prefill: the bootstrap service its ranks register with (started first).
        self.bootstrap = start_bootstrap(self.cfg)
        self.ranks = start_ranks(self.cfg, addrs)
        self._closed = False
        self.failure: str | None = None  # set once a rank died: the engine refuses new work
        # What each of this host's ranks returned at shutdown, in global rank order (one host:
        # all P * T, stage 0's T first, so [0] is stage 0's rank 0).
        self.rank_results: list[dict[str, Any]] = []
        try:
            self._wait_ready()
        except BaseException:  # Ctrl-C or a failed start: no rank may outlive us
            self._closed = True
            self.ranks.terminate(grace=0.0)
            if self.bootstrap is not None:
                self.bootstrap.close()
            for sock in [*self._req_socks, self._out_sock]:
                sock.close(linger=0)
            self._zmq.term()
            shutil.rmtree(self._dir, ignore_errors=True)  # nor its IPC socket directory
            raise
        self._reader = threading.Thread(target=self._read_outputs, daemon=True)
        self._reader.start()
        self._watchdog = threading.Thread(target=self._watch, daemon=True)
        self._watchdog.start()

    def _wait_ready(self, timeout_s: float = 300.0) -> None:
        ready: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while len(ready) < self.layout.dp_size:
            if self._out_sock.poll(200):
                msg: RankReady = self._out_sock.recv_pyobj()
                ready.add(msg.dp_rank)
                self.kv_free[msg.dp_rank] = self.kv_total[msg.dp_rank] = msg.kv_free
                self.kv_source = msg.kv_source
                self.kv_bytes_per_token = msg.kv_bytes_per_token
                self.weight_bytes, self.rss_bytes = msg.weight_bytes, msg.rss_bytes
                limits = RequestLimits(
                    msg.vocab_size, msg.context_length, msg.kv_free, self.layout.dp_size
                )
                if self.limits is None or limits.context_length < self.limits.context_length:
                    self.limits = limits
            dead = self.ranks.dead_rank()
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"engine failed to start: {dead or 'timed out'}")
        assert self.limits is not None
        self.context_length = self.limits.context_length
        log.info(
            "%s; context length %d; max running requests %d per DP group; vocabulary %d",
            self.kv_summary(),
            self.context_length,
            self.cfg.scheduler.max_running_requests,
            self.limits.vocab_size,
        )

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.failure is None:  # after a failure the leaders are gone: nothing to tell
            for d in range(self.layout.dp_size):
                try:
                    self._send(d, Shutdown())
                except RuntimeError:
                    break  # a rank died meanwhile: terminate() below cleans up
        try:
            self.rank_results = self.ranks.wait(timeout=30)
        except Exception:  # noqa: BLE001 - a dead rank already failed the engine; still clean up
            pass
        self.ranks.terminate(grace=1.0)
        if self.bootstrap is not None:
            self.bootstrap.close()
        for s in [*self._req_socks, self._out_sock]:
            s.close(linger=0)
        self._zmq.term()
        shutil.rmtree(self._dir, ignore_errors=True)  # the IPC socket files

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.shutdown()

    def _watch(self) -> None:
        """Health watchdog: a rank that died or failed takes the whole engine down, fast."""
        while not self._closed:
            dead = self.ranks.dead_rank()
            if dead:
                self._fail(dead)
                return
            time.sleep(0.25)

    def _fail(self, reason: str) -> None:
        first_line = reason.strip().splitlines()[0] if reason.strip() else reason
        with self._lock:
            self.failure = f"engine stopped: {first_line}"
            for rid, p in self._pending.items():
                if not p.done.is_set():
                    p.finish_reason = "error"
                    for listener in p.listeners:
                        listener(Delta(rid, [], [], "error", None))
                    p.done.set()
        self.ranks.terminate(grace=0.0)  # the survivors are stuck in collectives with the dead one
