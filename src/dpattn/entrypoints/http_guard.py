"""ASGI middleware in front of every route: the API key and the request body size limit.

Both answer OpenAI-style JSON errors before a route runs, so an unauthenticated or oversized
request never reaches the tokenizer or the engine.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from dpattn.entrypoints.openai_protocol import ApiError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = ("/health",)  # a supervisor's probe needs no key
DEFAULT_MAX_BODY_BYTES = 16 * 2**20


async def _answer(send: Send, err: ApiError, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    body = json.dumps(err.body()).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": err.status, "headers": [*head, *headers]})
    await send({"type": "http.response.body", "body": body})


class RequireApiKey:
    """`Authorization: Bearer <key>` on every path but OPEN_PATHS, else 401 (as vLLM, SGLang)."""

    def __init__(self, app: Asgi, api_key: str) -> None:
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        auth = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, token = auth.partition(b" ")
        # compare_digest: the time taken does not tell how much of a guessed key was right.
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
            err = ApiError(
                401,
                "invalid or missing API key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
                type_="authentication_error",
            )
            return await _answer(send, err, ((b"www-authenticate", b"Bearer"),))
        await self.app(scope, receive, send)


class BodyTooLarge(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body exceeds {limit} bytes", code="request_too_large")


class LimitBody:
    """413 for a body over `max_bytes`: by Content-Length up front, else while it streams in."""

    def __init__(self, app: Asgi, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _answer(send, BodyTooLarge(self.max_bytes))
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.max_bytes:  # chunked upload: raised inside the route, answered 413
                raise BodyTooLarge(self.max_bytes)
            return msg

        await self.app(scope, counted, send)
