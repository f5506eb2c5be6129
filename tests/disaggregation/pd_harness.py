"""Drives a prefill world and a decode world of rank threads side by side (no frontend, no HTTP
routes): each rank runs the real PrefillScheduler / DecodeScheduler with the zmq transfer, and the
prefill ranks register with a real bootstrap service. Also the colocated reference run."""

from __future__ import annotations

import random
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

from pd_driver import Result, SideRun, Spec, Wrap, drive_side

from dpattn.config import EngineConfig
from dpattn.disaggregation.bootstrap import BootstrapServer
from dpattn.distributed.parallel_state import Layout, ParallelState
from dpattn.runtime.launch import RankGroup

POOL = 256


def workload(seed: int, n: int, max_prompt: int = 20, max_new: int = 6) -> tuple[Spec, ...]:
    rng = random.Random(seed)
    return tuple(
        Spec(
            f"r{seed}-{i}",
            tuple(rng.randrange(3, 500) for _ in range(rng.randint(1, max_prompt))),
            rng.randint(1, max_new),
            rng.getrandbits(63),
            arrival=rng.randrange(4),
            decode_group=rng.randrange(8),
        )
        for i in range(n)
    )


def side_config(model: Path, tp: int, dp: int, mode: str, port: int, **kw: Any) -> EngineConfig:
    options: dict[str, Any] = dict(
        backend="thread",
        disaggregation_mode=mode,
        disaggregation_bootstrap_port=port,
        kv_pool_tokens=POOL,
        max_running_requests=8,
        chunked_prefill_size=8,
        disaggregation_heartbeat_s=0.2,
    )
    return EngineConfig.from_options(str(model), tp, dp, **{**options, **kw})


def run_pd(
    model: Path,
    prefill: tuple[int, int],
    decode: tuple[int, int],
    specs: tuple[Spec, ...],
    prefill_kw: dict[str, Any] | None = None,
    decode_kw: dict[str, Any] | None = None,
    start_prefill: bool = True,
    wrap_decode: Wrap | None = None,
    prefill_stop_at: int | None = None,
    decode_model: Path | None = None,
) -> tuple[list[SideRun], list[SideRun]]:
    """Both worlds at once; returns (prefill runs, decode runs) in rank order. `decode_model`:
    the decode server serves another checkpoint (a layout mismatch)."""
    server = BootstrapServer(0, prefill[0], host="127.0.0.1")
    port = server.port
    events: defaultdict[str, threading.Event] = defaultdict(threading.Event)
    try:
        groups = []
        sides = [("decode", decode, decode_kw, decode_model or model)]
        if start_prefill:
            sides.insert(0, ("prefill", prefill, prefill_kw, model))
        for side, (tp, dp), kw, side_model in sides:
            cfg = side_config(side_model, tp, dp, side, port, **(kw or {}))

            wrap = wrap_decode if side == "decode" else None
            stop = prefill_stop_at if side == "prefill" else None
            # the prefill server starts after the decode server and stays up while it runs
            peer = "decode" if side == "prefill" else None

            def fn(
                ps: ParallelState,
                cfg: EngineConfig = cfg,
                side: str = side,
                wrap: Any = wrap,
                stop: int | None = stop,
                peer: str | None = peer,
            ) -> SideRun:
                return drive_side(ps, cfg, specs, port, side, wrap, events, stop, peer)

            groups.append(RankGroup(fn, Layout(tp, dp), "thread", timeout_s=60))
        results = []
        for g in groups:  # a prefill side that "dies" (prefill_stop_at) takes its service along
            results.append(g.wait())
            if prefill_stop_at is not None:
                server.close()
    finally:
        server.close()
    if not start_prefill:
        return [], results[0]
    return results[0], results[1]


def run_colocated(model: Path, specs: tuple[Spec, ...]) -> dict[str, Result]:
    cfg = side_config(model, 1, 1, "null", 0)

    def fn(ps: ParallelState) -> SideRun:
        return drive_side(ps, cfg, specs, None, "null")

    [run] = RankGroup(fn, Layout(1, 1), "thread", timeout_s=60).wait()
    return run.outputs


def merged(runs: list[SideRun]) -> dict[str, Result]:
    out: dict[str, Result] = {}
    for r in runs:
        out.update(r.outputs)
    return out


def check_groups(runs: list[SideRun], layout: Layout) -> None:
    """Ranks of one group: identical queues after every step, identical outputs; no leaks."""
    for r in runs:
        lead = runs[r.dp_rank * layout.attn_tp_size]
        assert r.queues == lead.queues, f"rank {r.rank}: queues differ from its group leader's"
        assert r.outputs == lead.outputs, f"rank {r.rank}: outputs differ from its leader's"
        assert r.kv[0] == r.kv[1], f"rank {r.rank}: KV slots leaked ({r.kv})"
        assert r.rows[0] == r.rows[1], f"rank {r.rank}: request rows leaked ({r.rows})"
