"""`dpattn router --pd-disaggregation`: one HTTP front for prefill and decode servers.

Per request it mints a bootstrap room (random 63-bit id), adds `bootstrap_host`,
`bootstrap_port` and `bootstrap_room` to the body, sends it to one prefill server (its answer:
just the first token, not streamed) and one decode server, and returns the decode server's
answer, streamed or not. A prefill server that refuses the request (4xx/5xx) ends it: the decode
side's request is closed (the decode server aborts it) and the prefill server's error returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

DEFAULT_BOOTSTRAP_PORT = 8998
ROUTES = ("/v1/completions", "/v1/chat/completions", "/generate")


@dataclass(frozen=True)
class PrefillServer:
    url: str
    bootstrap_port: int = DEFAULT_BOOTSTRAP_PORT

    @property
    def host(self) -> str:
        return urlparse(self.url).hostname or "127.0.0.1"


def parse_prefill(args: list[str]) -> PrefillServer:
    """`--prefill URL [BOOTSTRAP_PORT]`."""
    if not 1 <= len(args) <= 2:
        raise ValueError(f"--prefill takes URL [BOOTSTRAP_PORT], got {args}")
    port = int(args[1]) if len(args) == 2 else DEFAULT_BOOTSTRAP_PORT
    return PrefillServer(args[0].rstrip("/"), port)


def _error(status: int, message: str, code: str) -> JSONResponse:
    err = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    return JSONResponse({"error": err}, status_code=status)


def _answer(resp: httpx.Response) -> Response:
    media = resp.headers.get("content-type", "application/json")
    return Response(resp.content, status_code=resp.status_code, media_type=media)


class PDRouter:
    def __init__(
        self, prefill: list[PrefillServer], decode: list[str], timeout_s: float | None = None
    ) -> None:
        if not prefill or not decode:
            raise ValueError("the PD router needs at least one --prefill and one --decode server")
        self.prefill = prefill
        self.decode = [u.rstrip("/") for u in decode]
        self._p = itertools.cycle(range(len(prefill)))
        self._d = itertools.cycle(range(len(self.decode)))
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=10.0))

    def pick(self) -> tuple[PrefillServer, str, dict[str, Any]]:
        p = self.prefill[next(self._p)]
        boot = dict(
            bootstrap_host=p.host,
            bootstrap_port=p.bootstrap_port,
            bootstrap_room=random.getrandbits(63),
        )
        return p, self.decode[next(self._d)], boot

    async def forward(self, path: str, request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the body is not valid JSON", "invalid_json")
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object", "invalid_json")
        prefill, decode, boot = self.pick()
        headers = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}
        body = {**body, **boot}
        # The prefill server's answer is the first token only: never streamed.
        p_body = {k: v for k, v in body.items() if k != "stream_options"} | {"stream": False}
        p_task = asyncio.create_task(
            self.client.post(prefill.url + path, json=p_body, headers=headers)
        )
        try:
            if body.get("stream"):
                return await self._stream(decode + path, body, headers, p_task)
            d_task = asyncio.create_task(
                self.client.post(decode + path, json=body, headers=headers)
            )
            return await self._both(p_task, d_task)
        except httpx.HTTPError as e:
            p_task.cancel()
            return _error(502, f"a server did not answer: {type(e).__name__}: {e}", "bad_gateway")

    async def _both(self, p_task: asyncio.Task[Any], d_task: asyncio.Task[Any]) -> Response:
        done, _ = await asyncio.wait({p_task, d_task}, return_when=asyncio.FIRST_COMPLETED)
        if p_task in done and not d_task.done():
            failed = await _prefill_failure(p_task)
            if failed is not None:
                d_task.cancel()  # the decode server sees the client go and aborts the request
                return failed
        resp = await d_task
        if resp.status_code >= 400:  # e.g. the transfer failed: the prefill may know why
            failed = await _prefill_failure(p_task)
            return failed if failed is not None else _answer(resp)
        # Its answer (the first token) is not needed; an error after the decode's is moot.
        p_task.add_done_callback(_consume)
        return _answer(resp)

    async def _stream(
        self, url: str, body: dict[str, Any], headers: dict[str, str], p_task: asyncio.Task[Any]
    ) -> Response:
        req = self.client.build_request("POST", url, json=body, headers=headers)
        resp = await self.client.send(req, stream=True)
        if resp.status_code != 200:
            await resp.aread()
            await resp.aclose()
            failed = await _prefill_failure(p_task)
            return failed if failed is not None else _answer(resp)

        async def relay() -> AsyncIterator[bytes]:
            """The decode server's events, unless the prefill server fails first."""
            chunks = resp.aiter_raw()
            nxt: asyncio.Future[bytes] | None = None
            checked = False  # the prefill server's answer was looked at
            try:
                while True:
                    if nxt is None:
                        nxt = asyncio.ensure_future(chunks.__anext__())
                        nxt.add_done_callback(_consume)
                    waits = {nxt} if checked else {nxt, p_task}
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                    if not checked and p_task.done():
                        checked = True
                        failed = await _prefill_failure(p_task)
                        if failed is not None:
                            yield b"data: " + bytes(failed.body) + b"\n\ndata: [DONE]\n\n"
                            return
                    if nxt.done():
                        try:
                            chunk = nxt.result()
                        except StopAsyncIteration:
                            return
                        nxt = None
                        yield chunk
            finally:
                if nxt is not None:
                    nxt.cancel()  # the client went away mid-stream, or the prefill failed
                await resp.aclose()

        return StreamingResponse(relay(), media_type="text/event-stream")

    async def close(self) -> None:
        await self.client.aclose()


def _consume(fut: asyncio.Future[Any]) -> None:
    """Retrieve a background future's outcome (no 'exception was never retrieved' noise)."""
    if not fut.cancelled():
        fut.exception()


async def _prefill_failure(p_task: asyncio.Task[Any]) -> Response | None:
    """The prefill server's error as the router's answer (None: it succeeded)."""
    try:
        resp = await p_task
    except httpx.HTTPError as e:
        return _error(502, f"the prefill server did not answer: {e}", "prefill_unavailable")
    return _answer(resp) if resp.status_code >= 400 else None


def create_router_app(router: PDRouter) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await router.close()

    app = FastAPI(
        title="dpattn PD router", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )

    for path in ROUTES:

        async def route(request: Request, path: str = path) -> Response:
            return await router.forward(path, request)

        app.add_api_route(path, route, methods=["POST"])

    @app.get("/v1/models")
    async def models() -> Response:
        return _answer(await router.client.get(router.decode[0] + "/v1/models"))

    @app.get("/health")
    async def health() -> Response:
        urls = [p.url for p in router.prefill] + router.decode
        down = []
        for url in urls:
            try:
                if (await router.client.get(url + "/health")).status_code != 200:
                    down.append(url)
            except httpx.HTTPError:
                down.append(url)
        if down:
            return _error(503, f"servers down: {', '.join(down)}", "server_unavailable")
        return JSONResponse({"status": "ok"})

    return app


def serve_router(
    prefill: list[PrefillServer], decode: list[str], host: str, port: int, log_level: str
) -> None:
    import uvicorn

    app = create_router_app(PDRouter(prefill, decode))
    print(f"dpattn router: http://{host}:{port}/v1 (PD disaggregation)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
