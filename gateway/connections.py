"""Connection limits uvicorn lacks: how long a client may take to *send* a request, and an
OpenAI-shaped 503 when a worker has too many connections or requests.

uvicorn closes a keep-alive connection that is idle *between* requests
(`timeout_keep_alive`), but nothing bounds a connection *inside* a request: every byte
received cancels the idle timer and no other timer is armed, so a client that trickles
its headers or its body a byte at a time holds the connection for ever (slowloris). ASGI
middleware cannot see the headers phase at all (the app is called once they are
complete), so the HTTP protocol itself arms one deadline per request:

- headers: from the connection's opening (its first request) or from the first byte of a
  later request on a keep-alive connection, until the headers are complete;
- body: from the end of the headers until the whole body has arrived.

A missed header deadline answers 408 `request_timeout` and closes the connection (a new
connection that sent nothing is closed without an answer, like an idle keep-alive one).
A missed body deadline closes the connection as soon as no response is in flight: at
once if the app already answered without reading the body, else right after the answer.
An app that has not answered yet is woken with the `BODY_LATE` flag in its scope state,
which the middleware turns into the 408.

A deadline is armed only when a request spans more than one read: one that arrives whole
(nearly every request) costs no timer at all.

uvicorn writes a response's head and its body with two `transport.write` calls: two
segments and two send syscalls per answer. `HeadHoldingTransport` keeps the head until the
body's first write (the same loop turn, for every response the gateway builds whole) and
sends both at once; a head whose body does not follow in that turn goes out at its end.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from gateway.config import ServerConfig
from gateway.errors import GatewayError, error_body, error_response
from gateway.logs import log_fields
from gateway.middleware import BODY_LATE

logger = logging.getLogger("gateway.connections")

HEADERS_LATE = GatewayError(
    408, "request_timeout", "The request headers did not arrive in time.", "invalid_request_error"
)
BUSY = GatewayError(
    503,
    "server_busy",
    "The gateway is at its connection limit; retry shortly.",
    headers={"retry-after": "1", "connection": "close"},
)


@dataclass(frozen=True)
class ConnectionLimits:
    """The [server] keys that bound a connection, as the protocol uses them."""

    header_timeout: float
    body_timeout: float
    max_connections: int

    @classmethod
    def of(cls, server: ServerConfig) -> ConnectionLimits:
        return cls(server.header_timeout_seconds, server.body_timeout_seconds, server.max_connections_per_worker)


def uvicorn_options(server: ServerConfig) -> dict[str, Any]:
    """What `serve` passes to uvicorn.run so every worker enforces the [server] limits.
    WebSockets are off: the gateway has no WebSocket route, and an upgraded connection
    would leave this protocol and its deadlines."""
    return {
        "http": functools.partial(GatewayHttpProtocol, limits=ConnectionLimits.of(server)),
        "ws": "none",
        "timeout_keep_alive": server.keepalive_timeout_seconds,
    }


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a receive deadline per request and its own
    connection limit (uvicorn's `limit_concurrency` answers in plain text)."""

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.limit_concurrency = None  # checked in on_headers_complete instead
        self.deadline: asyncio.TimerHandle | None = None
        # the deadline of the phase the parser just entered, armed when the read that
        # entered it is done, unless the request completed within that same read
        self.pending: tuple[float, Callable[[], None]] | None = None
        self.request_begun = False  # a byte of a request not yet complete has arrived

    # the connection ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(HeadHoldingTransport(transport, self))  # type: ignore[arg-type]
        self._arm(self.limits.header_timeout, self._headers_late)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.pending is not None:
            seconds, callback = self.pending
            self.pending = None
            self._arm(seconds, callback)

    # parser callbacks --------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.request_begun = True
        if self.deadline is None:  # a later request on a keep-alive connection
            self.pending = (self.limits.header_timeout, self._headers_late)

    def on_headers_complete(self) -> None:
        self._disarm()
        self.pending = (self.limits.body_timeout, self._body_late)
        if not self._over_limit():
            super().on_headers_complete()
            return
        log_fields(
            logger,
            logging.WARNING,
            {
                "event": "connection_limit",
                "client": self._client_ip(),
                "connections": len(self.connections),
                "requests": len(self.tasks),
            },
        )
        app, self.app = self.app, BUSY_APP
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    def on_message_complete(self) -> None:
        self._disarm()
        self.pending = None
        self.request_begun = False
        answered_early = self.cycle.response_complete
        super().on_message_complete()
        if answered_early and not self.transport.is_closing():
            # The app answered before the body ended: uvicorn armed its idle timer then and
            # the body's bytes cancelled it. Arm it again, or the connection idles for ever.
            self._unset_keepalive_if_required()
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    # deadlines ---------------------------------------------------------------------
    def _arm(self, seconds: float, callback: Callable[[], None]) -> None:
        self._disarm()
        self.deadline = self.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _responding(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _headers_late(self) -> None:
        self.deadline = None
        if self._responding():
            # a pipelined request stalls behind one still being answered: close after it
            self.cycle.keep_alive = False
            return
        self._log_timeout("headers")
        if self.request_begun:
            self.transport.write(_raw_response(HEADERS_LATE))
        self.transport.close()

    def _body_late(self) -> None:
        self.deadline = None
        self._log_timeout("body")
        if not self._responding():
            self.transport.close()  # answered already; the rest of the body is not wanted
            return
        self.cycle.keep_alive = False
        if not self.cycle.response_started:
            self.cycle.scope["state"][BODY_LATE] = True
            self.cycle.message_event.set()  # an app waiting for the body wakes to the flag

    def _over_limit(self) -> bool:
        # `connections` includes this one; `tasks` holds the requests in progress
        return len(self.connections) > self.limits.max_connections or len(self.tasks) >= self.limits.max_connections

    def _log_timeout(self, phase: str) -> None:
        log_fields(logger, logging.INFO, {"event": "request_timeout", "phase": phase, "client": self._client_ip()})

    def _client_ip(self) -> str | None:
        return self.client[0] if self.client else None


BUSY_APP = error_response(BUSY)


class HeadHoldingTransport:
    """The connection's transport for uvicorn, holding each response's head until the next
    write (its body), so both leave in one write; everything else is the transport's own.
    A held head is sent at the end of its loop turn at the latest, and before a close."""

    def __init__(self, transport: asyncio.Transport, protocol: GatewayHttpProtocol):
        self._transport = transport
        self._protocol = protocol
        self._held = b""
        self._cycle: object = None  # the request whose head was held (one per response)

    def write(self, data: bytes) -> None:
        cycle = self._protocol.cycle
        if self._held:
            data, self._held = self._held + data, b""
        elif cycle is not None and cycle is not self._cycle and cycle.response_started and not cycle.response_complete:
            self._cycle, self._held = cycle, data  # uvicorn writes the head once the response starts
            self._protocol.loop.call_soon(self._release)
            return
        self._transport.write(data)

    def _release(self) -> None:
        if self._held:
            data, self._held = self._held, b""
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self._release()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _raw_response(err: GatewayError) -> bytes:
    """An error answered by the protocol itself (no request reached the app)."""
    body = error_body(err)
    head = [
        STATUS_LINE[err.status],
        b"content-type: application/json\r\n",
        b"content-length: %d\r\n" % len(body),
        b"connection: close\r\n",
        b"\r\n",
    ]
    return b"".join(head) + body
