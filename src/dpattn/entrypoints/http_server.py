"""OpenAI-compatible HTTP server over the Engine (FastAPI + uvicorn, SSE streaming).

POST /v1/completions, POST /v1/chat/completions, GET /v1/models, POST /generate (SGLang's native
route: generate_route.py), SGLang's worker routes (sglang_api.py), GET /health, GET /metrics. A
request pins its DP group with the `X-Data-Parallel-Rank` header or a `dp_rank` (SGLang:
`data_parallel_rank`) body field; SGLang's extension keys: sglang_fields.py. Errors are
OpenAI-style JSON (`{"error": {"message", "type", "param", "code"}}`).
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from dpattn.entrypoints.chat_route import add_chat_route
from dpattn.entrypoints.chat_template import ChatTemplate, resolve_chat_template
from dpattn.entrypoints.engine import Engine
from dpattn.entrypoints.engine_watch import ExitOnEngineDeath
from dpattn.entrypoints.generate_route import add_generate_route
from dpattn.entrypoints.http_common import (
    DONE,
    encode,
    finish_openai,
    openai_usage,
    parse_body,
    sse,
    streaming_response,
    submit_openai,
)
from dpattn.entrypoints.http_guard import DEFAULT_MAX_BODY_BYTES, LimitBody, RequireApiKey
from dpattn.entrypoints.metrics import CONTENT_TYPE
from dpattn.entrypoints.openai_protocol import (
    ApiError,
    CompletionRequest,
    bad,
    completion_logprobs,
)
from dpattn.entrypoints.serving import Choice, ServerState
from dpattn.entrypoints.sglang_api import add_sglang_routes
from dpattn.entrypoints.structured import request_constraint
from dpattn.entrypoints.tokenize_route import add_tokenize_routes

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # as OpenAI's legacy completions; chat: up to the context


def model_card(st: ServerState, created: int) -> dict[str, Any]:
    cfg = st.engine.cfg
    return dict(
        id=st.model_name,
        object="model",
        created=created,  # when this server loaded the model
        owned_by="dpattn",
        root=cfg.model_path,
        max_model_len=st.context_length,
        dtype=cfg.runner.dtype,  # extensions: what a benchmark report names
        tp_size=cfg.tp_size,
        dp_size=cfg.dp_size,
        pp_size=cfg.pp_size,
    )


def add_openai_routes(app: FastAPI, st: ServerState, template: ChatTemplate | None = None) -> None:
    add_chat_route(app, st, template)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req: CompletionRequest = await parse_body(request, CompletionRequest)
        req.check()
        constraint = request_constraint(req)
        p = req.prompt
        raw = [p] if isinstance(p, str) or isinstance(p[0], int) else list(p)
        prompts = [encode(st, x) if isinstance(x, str) else list(x) for x in raw]
        want_lp, top_n = req.logprobs is not None, req.logprobs or 0
        max_new = COMPLETIONS_DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
        if max_new == 0 and not (req.echo and want_lp):
            raise bad(
                "'max_tokens' must be at least 1 (0 only with echo and logprobs)", "max_tokens"
            )
        # echo + logprobs: the prompt's own token logprobs (how evaluation harnesses score)
        start = 0 if req.echo and want_lp else -1
        sub, meta = await submit_openai(
            st, request, req, prompts, max_new, want_lp, top_n, start, constraint
        )
        meta = {"id": req.rid or f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", **meta}
        texts = [x if isinstance(x, str) else None for x in raw]  # echo: the prompt as sent

        def choice(
            c: Choice, text: str, ids: list[int], lps: list[Any], tops: list[Any], fr: str | None
        ) -> Any:
            if req.echo and not c.echoed:  # the prompt goes in front of the first chunk
                c.echoed = True
                p_ids = prompts[c.index // req.n]
                echoed = texts[c.index // req.n]
                text = (echoed if echoed is not None else _decode(p_ids)) + text
                ids, lps = p_ids + ids, [None, *c.input_logprobs, *lps]
                tops = [None, *c.input_top_logprobs, *tops]
            lp = None
            if want_lp:
                top = tops if top_n else None
                lp, c.text_offset = completion_logprobs(st.tokenizer, ids, lps, c.text_offset, top)
            return {"index": c.index, "text": text, "logprobs": lp, "finish_reason": fr}

        def _decode(ids: list[int]) -> str:
            return st.tokenizer.decode(ids) if st.tokenizer is not None else ""

        if req.stream:

            async def chunks() -> AsyncIterator[str]:
                async for c, text, d in sub.events():
                    if d.finish_reason in ("abort", "error"):
                        yield sse(sub.failure().body())  # type: ignore[union-attr]
                        break
                    first_echo = req.echo and not c.echoed
                    if text or d.finish_reason or (want_lp and d.new_ids) or first_echo:
                        args = (d.new_ids, d.new_logprobs, d.new_top_logprobs, d.finish_reason)
                        ch = choice(c, text, *args)
                        yield sse({**meta, "choices": [ch]})
                else:
                    if req.include_usage:
                        yield sse({**meta, "choices": [], "usage": openai_usage(sub, req.n)})
                yield DONE

            return streaming_response(sub, chunks())
        if (resp := await finish_openai(sub, request)) is not None:
            return resp
        choices = [
            choice(c, c.text, c.ids, c.logprobs, c.top_logprobs, c.finish_reason)
            for c in sub.choices
        ]
        return JSONResponse({**meta, "choices": choices, "usage": openai_usage(sub, req.n)})


def create_app(
    engine: Engine,
    model_name: str | None = None,
    max_queued_requests: int | None = 256,
    request_timeout_s: float | None = None,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    chat_template: str | None = None,
) -> FastAPI:
    """The FastAPI app serving `engine` (the caller owns the engine and shuts it down);
    chat_template: a built-in name or a file (default: see entrypoints/chat_template.py)."""
    chat = resolve_chat_template(chat_template, engine.tokenizer, engine.cfg.model_path)
    created = int(time.time())
    app = FastAPI(title="dpattn", docs_url=None, redoc_url=None, openapi_url=None)
    st = ServerState(engine, model_name, max_queued_requests, request_timeout_s)
    app.state.dpattn = st
    app.add_middleware(LimitBody, max_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(RequireApiKey, api_key=api_key)  # added last: runs first

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, e: HTTPException) -> JSONResponse:
        err = ApiError(e.status_code, f"{e.detail}", code=str(e.status_code))
        return JSONResponse(err.body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        err = ApiError(500, f"internal error: {type(e).__name__}: {e}")
        return JSONResponse(err.body(), status_code=500)

    @app.get("/health")
    async def health() -> Response:
        if engine.failure or engine._closed:
            raise ApiError(503, engine.failure or "engine is shut down", code="engine_unavailable")
        return JSONResponse({"status": "ok"})

    @app.post("/flush_cache")
    async def flush_cache() -> Response:
        # SGLang's route: cached prefixes no running request holds go back to the KV pools.
        try:
            await asyncio.get_running_loop().run_in_executor(None, engine.flush_cache)
        except (RuntimeError, TimeoutError) as e:
            raise ApiError(503, str(e), code="engine_unavailable") from None
        return JSONResponse({"status": "ok", "message": "Cache flushed."})

    @app.get("/metrics")
    async def metrics() -> Response:
        st.metrics.set_kv(list(engine.kv_free), list(engine.kv_total), list(engine.kv_cached))
        return Response(st.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": [model_card(st, created)]})

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> Response:
        st.check_model(model)
        return JSONResponse(model_card(st, created))

    add_openai_routes(app, st, chat)
    add_generate_route(app, st)
    add_tokenize_routes(app, st)
    add_sglang_routes(app, st)
    return app


def serve(
    model_path: str | None = None,
    tp_size: int = 1,
    dp_size: int = 1,
    host: str = "127.0.0.1",
    port: int = 30000,
    max_queued_requests: int | None = 256,
    served_model_name: str | None = None,
    log_level: str = "info",
    request_timeout_s: float | None = None,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    keep_alive_on_engine_death: bool = False,
    chat_template: str | None = None,
    access_log: bool = False,
    **engine_options: Any,
) -> None:
    """Run the server until SIGINT / SIGTERM, or until the engine dies (exit status 1); the
    engine and its ranks are always shut down."""
    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:  # fail on a taken port before loading the model
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SystemExit(f"dpattn serve: cannot listen on {host}:{port}: {e}") from None
    try:
        engine = Engine(model_path, tp_size, dp_size, log_level=log_level, **engine_options)
        try:
            app = create_app(
                engine,
                served_model_name,
                max_queued_requests,
                request_timeout_s,
                api_key,
                max_body_bytes,
                chat_template,
            )
            config = uvicorn.Config(
                app, log_level=log_level, timeout_graceful_shutdown=5, access_log=access_log
            )
            name = app.state.dpattn.model_name
            print(f"dpattn serve: http://{host}:{port}/v1 serving {name}", flush=True)
            print(
                f"dpattn serve: {engine.kv_summary()}; context length {engine.context_length}; "
                f"max running requests {engine.cfg.scheduler.max_running_requests} per DP group",
                flush=True,
            )
            server = uvicorn.Server(config)
            watch = None if keep_alive_on_engine_death else ExitOnEngineDeath(engine, server)
            try:
                server.run(sockets=[sock])
            finally:
                if watch is not None:
                    watch.stop()
        finally:
            engine.shutdown()
    finally:
        sock.close()
    if watch is not None and watch.reason:
        raise SystemExit(f"dpattn serve: exiting: {watch.reason}")
