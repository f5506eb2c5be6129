"""SGLang's worker routes: what sglang-router and SGLang's tools ask a worker besides generation.

- `GET /server_info` (and SGLang's older `/get_server_info`): the serving arguments the router
  reads (`model_path`, `served_model_name`, `tp_size`, `dp_size`, `load_balance_method`,
  `disaggregation_mode`) and the effective limits (`context_length`, `max_running_requests` and
  `max_total_tokens` per DP group, `vocab_size`, ...), `internal_states` per DP group, `version`.
- `GET /model_info` (and `/get_model_info`): `model_path`, `tokenizer_path`, `is_generation`,
  `model_type`, `architectures`, ...
- `GET /get_load`: SGLang's list, one entry per DP group: `dp_rank`, `num_reqs` (running and
  waiting), `num_waiting_reqs`, `num_tokens` (KV slots its requests hold; cached prefixes no
  request holds are free), as of the group's last scheduler step. The router's load of a worker
  is the sum of `num_tokens`.
- `GET /health_generate`: one real one-token generation through the engine: 200 when it
  completes within HEALTH_GENERATE_TIMEOUT_S, else 503 (the request aborted, its KV freed). A
  full queue (429) is healthy if the engine steps meanwhile. A disaggregated server generates
  only with its peer, so it makes no request and answers as /health does (and says so).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

import dpattn
from dpattn.entrypoints.errors import ApiError
from dpattn.entrypoints.serving import ServerState, Submission
from dpattn.executor.sampling_params import SamplingParams
from dpattn.messages import StepStats

HEALTH_GENERATE_TIMEOUT_S = 20.0  # SGLang's default


class LoadTracker:
    """Each DP group's last StepStats (an Engine step listener) and a step count."""

    def __init__(self, dp_size: int) -> None:
        self.last: list[StepStats | None] = [None] * dp_size
        self.steps = 0

    def on_step(self, dp_rank: int, stats: StepStats, kv_free: int) -> None:
        self.last[dp_rank] = stats
        self.steps += 1


def server_info(st: ServerState) -> dict[str, Any]:
    e, cfg = st.engine, st.engine.cfg
    lim = e.limits
    per_group = cfg.scheduler.max_running_requests
    return dict(
        model_path=cfg.model_path,
        tokenizer_path=cfg.model_path,
        served_model_name=st.model_name,
        tp_size=cfg.tp_size,
        dp_size=cfg.dp_size,
        pp_size=cfg.pp_size,
        enable_dp_attention=cfg.dp_size > 1,
        load_balance_method=cfg.router_policy,
        disaggregation_mode=cfg.disaggregation_mode,
        disaggregation_bootstrap_port=cfg.disaggregation_bootstrap_port,
        context_length=e.context_length,
        max_req_input_len=e.context_length - 1,
        max_running_requests=per_group,  # per DP group, as max_total_tokens
        max_total_tokens=lim.kv_pool_tokens if lim else None,
        vocab_size=lim.vocab_size if lim else None,
        chunked_prefill_size=cfg.scheduler.chunked_prefill_size,
        page_size=cfg.scheduler.page_size,
        disable_radix_cache=cfg.scheduler.disable_radix_cache,
        schedule_policy=cfg.scheduler.schedule_policy,
        dtype=cfg.runner.dtype,
        device=cfg.device,
        nnodes=cfg.nnodes,
        kv_cache_bytes_per_token=e.kv_bytes_per_token,
        internal_states=[
            dict(dp_rank=d, max_total_num_tokens=total, max_running_requests=per_group)
            for d, total in enumerate(e.kv_total)
        ],
        version=dpattn.__version__,
    )


def model_info(st: ServerState) -> dict[str, Any]:
    path = st.engine.cfg.model_path
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    return dict(
        model_path=path,
        tokenizer_path=path,
        is_generation=True,
        preferred_sampling_params=None,
        weight_version="default",
        has_image_understanding=False,
        has_audio_understanding=False,
        model_type=config.get("model_type"),
        architectures=config.get("architectures"),
    )


def loads(st: ServerState, tracker: LoadTracker) -> list[dict[str, int]]:
    e = st.engine
    out = []
    for d in range(st.dp_size):
        stats = tracker.last[d]
        running, waiting = (stats.running, stats.queued) if stats is not None else (0, 0)
        out.append(
            dict(
                dp_rank=d,
                num_reqs=running + waiting,
                num_waiting_reqs=waiting,
                num_tokens=e.kv_total[d] - e.kv_free[d],
            )
        )
    return out


async def _one_token(st: ServerState, tracker: LoadTracker) -> str | None:
    """None if a one-token generation completed in time (or, at a full queue, the engine
    stepped); else why not."""
    timeout = HEALTH_GENERATE_TIMEOUT_S
    sub = Submission(st)
    try:
        await sub.start([([0], SamplingParams(max_new_tokens=1, temperature=0.0), None)], False)
    except ApiError as e:
        if e.status != 429:
            return e.message
        steps, deadline = tracker.steps, time.monotonic() + timeout
        while tracker.steps == steps and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return (
            None if tracker.steps != steps else f"the queue is full and no step ran in {timeout} s"
        )

    async def consume() -> None:
        async for _ in sub.events():
            pass

    try:
        await asyncio.wait_for(consume(), timeout)
    except (asyncio.TimeoutError, ApiError):
        sub.close()  # aborted: its KV is freed
        return f"a one-token generation did not finish within {timeout} s"
    failure = sub.failure()
    return None if failure is None else failure.message


def add_sglang_routes(app: FastAPI, st: ServerState) -> None:
    tracker = LoadTracker(st.dp_size)
    st.engine.step_listeners.append(tracker.on_step)

    async def get_server_info() -> Response:
        return JSONResponse(server_info(st))

    async def get_model_info() -> Response:
        return JSONResponse(model_info(st))

    for path in ("/server_info", "/get_server_info"):
        app.add_api_route(path, get_server_info, methods=["GET"])
    for path in ("/model_info", "/get_model_info"):
        app.add_api_route(path, get_model_info, methods=["GET"])

    @app.get("/get_load")
    async def get_load() -> Response:
        return JSONResponse(loads(st, tracker))

    @app.get("/health_generate")
    async def health_generate() -> Response:
        engine = st.engine
        if engine.failure:
            raise ApiError(503, engine.failure, code="engine_unavailable")
        if engine.cfg.disaggregation_mode != "null":
            note = "a disaggregated server generates only with its peer: no request was made"
            return JSONResponse({"status": "ok", "generated": False, "note": note})
        why = await _one_token(st, tracker)
        if why is not None:
            raise ApiError(503, f"health_generate failed: {why}", code="engine_unavailable")
        return JSONResponse({"status": "ok", "generated": True})
