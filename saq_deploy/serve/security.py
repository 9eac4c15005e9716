"""Request guards as one pure ASGI middleware (no FastAPI import): a limit on requests in flight,
a bearer-token check with a constant-time comparison, then a request-body size limit, all before
the app parses anything.

Order matters: the probes bypass the in-flight limit (an overloaded replica is still alive, and
its orchestrator must not kill it for being busy); an unauthenticated client learns nothing about
request validation; an oversized body is refused from its Content-Length (or, for chunked
uploads, as soon as the running total passes the limit) without ever being buffered whole.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Liveness/readiness probes and the API description stay open for load balancers.
PUBLIC_PATHS = ("/healthz", "/readyz", "/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect")
PROBE_PATHS = ("/healthz", "/readyz")
BODY_METHODS = ("POST", "PUT", "PATCH")


def bearer_matches(authorization: str | None, key: str) -> bool:
    """``Authorization: Bearer <key>``, compared with ``hmac.compare_digest`` (constant time)."""
    if not authorization:
        return False
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode("utf-8", "surrogateescape"), key.encode("utf-8"))


async def send_json(send: Send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


def _adding_headers(send: Send, extra: dict[str, str]) -> Send:
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()]

    async def wrapped(msg: Message) -> None:
        if msg["type"] == "http.response.start":
            msg = {**msg, "headers": [*msg.get("headers", []), *raw]}
        await send(msg)

    return wrapped


class GuardMiddleware:
    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body_bytes: int,
                 extra_headers: dict[str, str] | None = None, max_in_flight: int | None = None) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.extra_headers = extra_headers or {}
        self.max_in_flight = max_in_flight
        self.in_flight = 0  # one event loop: no lock needed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.extra_headers:
            send = _adding_headers(send, self.extra_headers)
        if scope.get("path", "") in PROBE_PATHS:
            await self.app(scope, receive, send)
            return
        if self.max_in_flight is not None and self.in_flight >= self.max_in_flight:
            await send_json(send, 503, {"error": f"server overloaded: {self.in_flight} requests in flight; "
                                        "retry later"}, {"Retry-After": "1"})
            return
        self.in_flight += 1
        try:
            await self._guarded(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key is not None and scope.get("path", "") not in PUBLIC_PATHS \
                and not bearer_matches(headers.get("authorization"), self.api_key):
            why = "missing" if "authorization" not in headers else "invalid"
            await send_json(send, 401, {"error": f"{why} API key: send 'Authorization: Bearer <key>'"},
                            {"WWW-Authenticate": "Bearer"})
            return
        if scope.get("method") in BODY_METHODS:
            if await self._check_length(headers.get("content-length"), send):
                return
            await _LimitedRequest(self.app, self.max_body_bytes)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _check_length(self, value: str | None, send: Send) -> bool:
        if value is None:
            return False
        if not value.isdigit():
            await send_json(send, 400, {"error": "invalid Content-Length header"})
            return True
        if int(value) > self.max_body_bytes:
            await send_json(send, 413, {"error": f"request body of {value} bytes is larger than the "
                                        f"{self.max_body_bytes}-byte limit"})
            return True
        return False


class _LimitedRequest:
    """One request whose body is counted as the app reads it (chunked uploads have no
    Content-Length). Past the limit: answer 413, hand the app a disconnect, drop what it sends."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit
        self.seen = 0
        self.refused = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def limited_receive() -> Message:
            if self.refused:
                return {"type": "http.disconnect"}
            msg = await receive()
            if msg["type"] == "http.request":
                self.seen += len(msg.get("body", b""))
                if self.seen > self.limit:
                    self.refused = True
                    await send_json(send, 413, {"error": f"request body is larger than the {self.limit}-byte "
                                                "limit"})
                    return {"type": "http.disconnect"}
            return msg

        async def guarded_send(msg: Message) -> None:
            if not self.refused:
                await send(msg)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not self.refused:  # the app's own failure: not ours to hide
                raise
