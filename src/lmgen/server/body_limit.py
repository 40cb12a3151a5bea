"""A cap on request-body size, enforced before anything parses the body: an ASGI middleware that answers 413
in OpenAI's error shape when ``Content-Length`` declares more than the cap (without reading the body) or
when the bytes actually received pass it (a chunked or lying client), holding at most the cap in memory."""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

from lmgen.server.protocol.api_error import APIError

DEFAULT_MAX_REQUEST_BYTES = 4 << 20  # a long conversation is well under 1 MB; a few MB leaves room

Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


class BodyLimit:
    """Wraps an ASGI app; HTTP requests whose body passes ``max_bytes`` get 413 and never reach it."""

    def __init__(self, app: Any, max_bytes: int = DEFAULT_MAX_REQUEST_BYTES):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValueError(f"max_request_bytes must be a positive integer, got {max_bytes!r}")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(send, f"declares {declared} bytes")
            return
        chunks: list[bytes] = []
        size = 0
        pending: list[dict] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: let the app see it
                pending.append(message)
                break
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._refuse(send, f"passed {self.max_bytes} bytes while being read")
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        pending.insert(0, {"type": "http.request", "body": b"".join(chunks), "more_body": False})

        async def replay() -> dict:
            return pending.pop(0) if pending else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send, what: str) -> None:
        err = APIError(413, f"the request body {what}; the limit is {self.max_bytes} bytes "
                              f"(lmgen serve --max-request-bytes)", param=None, code="request_too_large")
        payload = json.dumps(err.body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})


def _content_length(scope: dict) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
