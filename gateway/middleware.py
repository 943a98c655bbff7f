"""The one ASGI middleware: request id, body size and time limits, rate headers, metrics,
access log.

Pure ASGI (no BaseHTTPMiddleware) so streamed responses stay streamed and the cost per
request is a few dict operations. Each request gets a `RequestContext` (its id, and what
the routes learn on the way: tenant, rate-limit bucket, upstream time, task id), which the
middleware turns into the response's headers, the metrics and the access log line.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import GatewayError, error_response
from gateway.logs import AccessLog
from gateway.metrics import Metrics
from gateway.quotas import format_duration
from gateway.store.base import RateInfo

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Set in scope["state"] by the HTTP protocol (gateway/connections.py) when a request's body
# misses its deadline; the next receive answers 408.
BODY_LATE = "body_late"
CONTEXT = "context"  # the RequestContext's key in scope["state"]


@dataclass(slots=True)
class RequestContext:
    """One request's record, filled by the routes, read by the middleware at the end."""

    request_id: str
    tenant: str | None = None  # the authenticated tenant: the metric label and log field
    key_id: str | None = None  # which of the tenant's keys (None for a JWT): logged, never the key
    rate: RateInfo | None = None  # the requests_per_minute bucket, for the x-ratelimit headers
    upstream_ms: float | None = None  # time the upstream took on a create
    task_id: str | None = None  # the task the request created, read or deleted
    idempotency_key: str | None = None  # the Idempotency-Key a create holds (create_once)
    relay: str | None = None  # the relay a create went to last (contract §14)
    relay_attempts: int | None = None  # how many relays the create tried


def request_context(scope: Scope) -> RequestContext:
    context: RequestContext = scope["state"][CONTEXT]
    return context


class GatewayMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        access_log: AccessLog,
        max_body_bytes: int,
        trusted_proxies: tuple[Network, ...] = (),
    ):
        self.app = app
        self.trusted_proxies = trusted_proxies
        self.metrics = metrics
        self.access_log = access_log
        self.max_body_bytes = max_body_bytes
        self.too_large = GatewayError(
            413, "request_too_large", f"The request body is larger than {max_body_bytes} bytes."
        )
        # `connection: close`: the rest of a late body must not be read as the next request
        self.too_slow = GatewayError(
            408,
            "request_timeout",
            "The request body did not arrive in time.",
            "invalid_request_error",
            headers={"connection": "close"},
        )
        # new request ids: this process's random prefix and a counter (unique, no syscall)
        self._id_prefix = f"req_{secrets.token_hex(8)}"
        self._ids = itertools.count()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        state: dict[str, Any] = scope.setdefault("state", {})
        request_id, declared_length = _request_id_and_length(scope["headers"])
        context = state[CONTEXT] = RequestContext(request_id or f"{self._id_prefix}{next(self._ids):016x}")
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = message.setdefault("headers", [])
                headers.append((b"x-request-id", context.request_id.encode()))
                rate = context.rate
                if rate is not None:
                    headers += (
                        (b"x-ratelimit-limit-requests", b"%d" % rate.limit),
                        (b"x-ratelimit-remaining-requests", b"%d" % rate.remaining),
                        (b"x-ratelimit-reset-requests", format_duration(rate.reset_seconds).encode()),
                    )
            await send(message)

        try:
            if declared_length > self.max_body_bytes:
                await error_response(self.too_large)(scope, receive, send_wrapper)
            else:
                await self.app(scope, self._limited(receive, state), send_wrapper)
        finally:
            self._record(scope, context, status, time.perf_counter() - start)

    def _limited(self, receive: Receive, state: dict[str, Any]) -> Receive:
        """Count body bytes as they arrive, for bodies sent without Content-Length, and
        give up on a body that missed its deadline (BODY_LATE); the route's exception
        handler renders the 413 or 408."""
        seen = 0

        async def wrapped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise self.too_large
                if message.get("more_body", False) and state.get(BODY_LATE):
                    raise self.too_slow
            return message

        return wrapped

    def _record(self, scope: Scope, context: RequestContext, status: int, seconds: float) -> None:
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        method = scope["method"]
        self.metrics.count(self.metrics.requests, (context.tenant or "", template, method, str(status)))
        self.metrics.observe(self.metrics.request_duration, (template, method), seconds)
        fields: dict[str, Any] = {
            "request_id": context.request_id,
            "client": client_ip(scope, self.trusted_proxies),
            "tenant": context.tenant,
            "method": method,
            "route": template,
            "status": status,
            "duration_ms": round(seconds * 1000, 2),
        }
        if context.key_id is not None:
            fields["key_id"] = context.key_id
        if context.upstream_ms is not None:
            fields["upstream_ms"] = round(context.upstream_ms, 2)
        if context.task_id is not None:
            fields["task_id"] = context.task_id
        if context.relay is not None:
            fields["relay"] = context.relay
            fields["relay_attempts"] = context.relay_attempts
        self.access_log.write(fields)


def client_ip(scope: Scope, trusted_proxies: tuple[Network, ...]) -> str | None:
    """The peer, or, behind a trusted proxy, the nearest X-Forwarded-For hop not trusted
    (the access log's `client` and the audit trail's `ip`). A hop that is not an IP
    address stops the walk at the peer: what lies beyond it cannot be placed."""
    peer = scope.get("client")
    ip: str | None = peer[0] if peer else None
    if not ip or not trusted_proxies or not _trusted(ip, trusted_proxies):
        return ip
    # every X-Forwarded-For line, in order, is one list (RFC 9110 5.3): a proxy that adds a
    # line of its own puts it after the client's, so the walk starts at the last line
    hops: list[str] = [
        h.strip()
        for name, value in scope["headers"]
        if name == b"x-forwarded-for"
        for h in value.decode("latin-1").split(",")
    ]
    for hop in reversed(hops):
        if not _is_ip(hop):
            return ip  # a hop that is no address ("unknown", "host:port"): only the peer is known
        if not _trusted(hop, trusted_proxies):
            return hop
    return ip


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _trusted(ip: str, trusted_proxies: tuple[Network, ...]) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in net for net in trusted_proxies)


def _request_id_and_length(headers: list[tuple[bytes, bytes]]) -> tuple[str | None, int]:
    """The caller's X-Request-ID when it is a safe token (else None: the middleware makes
    one), and the declared Content-Length (0 when absent or not a number), in one pass."""
    request_id: str | None = None
    length = 0
    seen_id = seen_length = False
    for name, value in headers:
        if name == b"content-length" and not seen_length:
            seen_length = True
            try:
                length = int(value)
            except ValueError:
                length = 0
        elif name == b"x-request-id" and not seen_id:
            seen_id = True
            candidate = value.decode("latin-1")
            if SAFE_REQUEST_ID.match(candidate):
                request_id = candidate
    return request_id, length
