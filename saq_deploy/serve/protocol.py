"""uvicorn's h11 protocol with read deadlines, so slow clients cannot hold connections forever.

uvicorn has a keep-alive timeout (the idle wait *between* requests) but no deadline for reading a
request: a socket that connects, sends half a header (or nothing) and waits stays open for ever,
holding a file descriptor. Here each request gets two deadlines:

- header: from the connection's first moment (or, on a keep-alive connection, from the first byte
  of the next request) until the request line and headers are complete; past it: 408 and close;
- body: from the end of the headers until the body is complete (a client trickling a byte per
  second); past it: 408 (when nothing was answered yet) and close; the handler sees a disconnect.

The idle wait between keep-alive requests stays uvicorn's keep-alive timeout, so pooled clients are
not cut. On shutdown uvicorn closes every connection without a request in progress (half-open ones
included) at once; one still sending its body is cut by the body deadline, inside the drain time.

Lingering close: when the server answers early (413 for an oversized body) on a connection that
must then close, the client is usually still uploading. Closing a socket with unread input makes
the kernel send a reset, and the reset can destroy the client's copy of the 413 before it reads
it. So such a close first shuts the write side (FIN after the answer), discards what still
arrives for up to ``LINGER_S`` (or ``LINGER_BYTES``), then closes.

uvicorn's own 400 for an unparsable request is text/plain; this one answers ``{"error": ...}`` like
the rest of the API. Written against uvicorn 0.54 (``H11Protocol`` internals: ``conn``, ``cycle``,
``handle_events``, ``on_response_complete``, ``send_400_response``); tests/serve/test_serve_slowclients.py
drives it over real sockets. Only h11 is wrapped: the server names this class explicitly, so an
installed httptools (uvicorn[standard]) is not picked up instead.
"""

from __future__ import annotations

import json
import logging
import resource

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("saq_deploy.serve")
FD_CAP = 1 << 20  # when the hard limit is "unlimited": a finite soft limit the kernel accepts
LINGER_S = 2.0
LINGER_BYTES = 8 << 20


class _LingeringTransport:
    """The protocol's view of its transport: ``close()`` lingers while the request body is still
    arriving (see the module docstring); everything else is the real transport's."""

    def __init__(self, transport, protocol: DeadlineH11Protocol) -> None:
        self._real, self._protocol = transport, protocol
        self.lingering = False
        self._timer = None

    def __getattr__(self, name: str):
        return getattr(self._real, name)

    def is_closing(self) -> bool:
        return self.lingering or self._real.is_closing()

    def close(self) -> None:
        if self.lingering or self._real.is_closing():
            return
        if self._protocol.conn.their_state is not h11.SEND_BODY or not self._real.can_write_eof():
            self._real.close()
            return
        self.lingering = True
        self._real.write_eof()
        self._real.resume_reading()  # uvicorn may have paused it (flow control)
        self._timer = self._protocol.loop.call_later(LINGER_S, self._real.close)

    def cancel_linger(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


def _raw_response(status: int, reason: str, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n")
    return head.encode("latin-1") + body


class DeadlineH11Protocol(H11Protocol):
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._deadline = None
        self._phase: str | None = None
        self._first = True  # no request seen yet: the header deadline runs from the connect
        self._lingering = _LingeringTransport(transport, self)
        self._discarded = 0
        super().connection_made(self._lingering)  # type: ignore[arg-type]
        self._arm("header")

    def connection_lost(self, exc) -> None:
        self._disarm()
        self._lingering.cancel_linger()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering.lingering:  # answered and closing: drop the rest of the upload
            self._discarded += len(data)
            if self._discarded > LINGER_BYTES:
                self._lingering._real.close()
            return
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        self._sync()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._sync()

    def _sync(self) -> None:
        """Match the deadline to what the client owes us now."""
        state = self.conn.their_state
        if state is h11.IDLE:
            # waiting for a request line: owed only on a new connection or once bytes of the next
            # request have arrived; an idle keep-alive connection is uvicorn's keep-alive timer's
            if self._first or self.conn.trailing_data[0]:
                if self._phase != "header":
                    self._arm("header")
            else:
                self._disarm()
        elif state is h11.SEND_BODY:
            self._first = False
            if self._phase != "body":
                self._arm("body")
        else:  # request read (the app's turn), or the connection is closing / in error
            self._first = False
            self._disarm()

    def _arm(self, phase: str) -> None:
        self._disarm()
        self._phase = phase
        delay = self.header_timeout_s if phase == "header" else self.body_timeout_s
        self._deadline = self.loop.call_later(delay, self._expired, phase)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline, self._phase = None, None

    def _expired(self, phase: str) -> None:
        self._deadline, self._phase = None, None
        if self.transport.is_closing():
            return
        limit = self.header_timeout_s if phase == "header" else self.body_timeout_s
        # debug, not info: a slowloris attack would otherwise write one log line per socket
        log.debug("closing %s: request %s not complete within %g s",
                  f"{self.client[0]}:{self.client[1]}" if self.client else "a client", phase, limit)
        # answer only while nothing has been sent for this request (a 413 may already be out
        # while the client is still uploading the body it announced)
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            what = "headers" if phase == "header" else "body"
            self.transport.write(_raw_response(408, "Request Timeout",
                                               f"request {what} not received within {limit:g} s"))
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # the handler's next receive() returns http.disconnect and its send() is dropped,
            # instead of writing a second response after the 408
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        body = json.dumps({"error": "invalid HTTP request (malformed request line or headers, or headers "
                                    "larger than 16 KiB)"}).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close"),
                   (b"content-length", str(len(body)).encode())]
        try:
            out = self.conn.send(h11.Response(status_code=400, headers=headers, reason=b"Bad Request"))
            out += self.conn.send(h11.Data(data=body)) + self.conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError:  # a response was already under way: just close
            out = b""
        if out:
            self.transport.write(out)
        self.transport.close()


def deadline_protocol(header_timeout_s: float, body_timeout_s: float) -> type[DeadlineH11Protocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` with these deadlines."""
    return type("ServeH11Protocol", (DeadlineH11Protocol,),
                {"header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s})


def raise_fd_limit() -> tuple[int, int, int]:
    """Raise the soft open-files limit to the hard limit; (soft before, soft now, hard).

    Every connection, half-open ones included, is a file descriptor: the common default soft limit
    (1024) is reached by a thousand idle sockets, and past it accept() fails for everyone, liveness
    probes included. The hard limit is the ceiling an unprivileged process may set.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = FD_CAP if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):  # e.g. macOS caps at OPEN_MAX below "unlimited"
            return soft, soft, hard
        return soft, target, hard
    return soft, soft, hard
