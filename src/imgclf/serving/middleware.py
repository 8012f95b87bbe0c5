"""The server's guards, as plain ASGI middleware: a request log line, bearer-token auth, a body size cap and
read deadline, and (on a loopback address) the Host header's check.

Plain ASGI (not Starlette's BaseHTTPMiddleware) so the size cap sees the body as it streams in: a
``Content-Length`` over the cap is refused before one byte is read, and a body without one (chunked)
is cut off at the first chunk that crosses it, never read whole. A body that stops arriving for
BODY_TIMEOUT seconds is given up (a slow client holds no connection for ever).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from imgclf.logs import get_logger

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = get_logger("serve")
BODY_TIMEOUT = 30.0  # seconds a request body may go without a byte
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


class BodyStalled(Exception):
    """Raised from ``receive`` when no part of the body came for BODY_TIMEOUT seconds; the app answers 408."""

    def __init__(self):
        super().__init__(f"the request body stopped arriving for {BODY_TIMEOUT:g} s; send it whole")


class BodyTooLarge(Exception):
    """Raised from ``receive`` when the body crosses the cap; the app turns it into a 413 JSON answer."""

    def __init__(self, limit: int):
        self.limit = limit
        super().__init__(f"request body is over the server's limit of {limit / 2**20:.3g} MB (--max-upload-mb)")


async def send_json(send: Send, status: int, data: dict, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(data).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class RequestLog:
    """One line per request: method, path, status, latency, bytes in and out. Never the body or the query."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, seen = time.perf_counter(), {"status": 500, "in": 0, "out": 0}

        async def counting_receive() -> Message:
            message = await receive()
            seen["in"] += len(message.get("body", b""))
            return message

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
            elif message["type"] == "http.response.body":
                seen["out"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            log.info("%s %s %d %.1f ms in=%dB out=%dB", scope["method"], scope["path"], seen["status"],
                     (time.perf_counter() - start) * 1000, seen["in"], seen["out"])


class BearerAuth:
    """With a token, every path but the health checks needs ``Authorization: Bearer TOKEN``."""

    def __init__(self, app: ASGIApp, token: str | None, open_paths: tuple[str, ...]):
        self.app, self.open_paths = app, open_paths
        self.expected = token.encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.expected is None or scope["type"] != "http" or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        scheme, _, given = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.expected):  # any case: RFC 9110
            return await self.app(scope, receive, send)
        await send_json(send, 401, {"error": "missing or wrong token: send the header 'Authorization: Bearer TOKEN' "
                                             "with the --token the server was started with"},
                        [(b"www-authenticate", b"Bearer")])


class BodyLimit:
    """Refuse a body over ``limit`` bytes with 413, by its Content-Length or while it streams in."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await send_json(send, 413, {"error": str(BodyTooLarge(self.limit))})
        received = 0

        async def capped_receive() -> Message:
            nonlocal received
            try:
                message = await asyncio.wait_for(receive(), BODY_TIMEOUT)
            except TimeoutError:
                raise BodyStalled() from None
            received += len(message.get("body", b""))
            if received > self.limit:
                raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, capped_receive, send)


class LoopbackHosts:
    """On a loopback address, only requests whose Host header names this machine: a web page the user opens
    cannot reach the server by pointing its own domain at 127.0.0.1 (DNS rebinding)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        host = dict(scope.get("headers", [])).get(b"host", b"").decode("latin-1")
        name = host[1:host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0] if host.count(":") == 1 \
            else host
        if scope["type"] != "http" or name.lower() in LOOPBACK_NAMES:
            return await self.app(scope, receive, send)
        await send_json(send, 421, {"error": f"Host {host[:60]!r} is not this machine: a server on a loopback "
                                             "address answers requests to localhost, 127.0.0.1 or [::1] only"})
