"""The one ASGI middleware: request id, body size and time limits, rate headers, metrics,
access log.

Pure ASGI (no BaseHTTPMiddleware) so streamed responses stay streamed and the cost per
request is a few dict operations. Routes leave what it needs in `scope["state"]`:
`tenant` (the metric label) and `rate` (the bucket info for the x-ratelimit headers).
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import GatewayError, error_response
from gateway.logs import AccessLog
from gateway.metrics import Metrics
from gateway.quotas import rate_headers

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Set in scope["state"] by the HTTP protocol (gateway/connections.py) when a request's body
# misses its deadline; the next receive answers 408.
BODY_LATE = "body_late"


class GatewayMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics, access_log: AccessLog, max_body_bytes: int, trusted_proxies: tuple[Network, ...] = ()):
        self.app = app
        self.trusted_proxies = trusted_proxies
        self.metrics = metrics
        self.access_log = access_log
        self.max_body_bytes = max_body_bytes
        self.too_large = GatewayError(413, "request_too_large", f"The request body is larger than {max_body_bytes} bytes.")
        # `connection: close`: the rest of a late body must not be read as the next request
        self.too_slow = GatewayError(408, "request_timeout", "The request body did not arrive in time.",
                                     "invalid_request_error", headers={"connection": "close"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = _request_id(scope)
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = request_id
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = message.setdefault("headers", [])
                headers.append((b"x-request-id", request_id.encode()))
                for name, value in rate_headers(state.get("rate")).items():
                    headers.append((name.encode(), value.encode()))
            await send(message)

        try:
            if _declared_length(scope) > self.max_body_bytes:
                await error_response(self.too_large)(scope, receive, send_wrapper)
            else:
                await self.app(scope, self._limited(receive, state), send_wrapper)
        finally:
            self._record(scope, state, request_id, status, time.perf_counter() - start)

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

    def _record(self, scope: Scope, state: dict[str, Any], request_id: str, status: int, seconds: float) -> None:
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        method = scope["method"]
        tenant = state.get("tenant", "")
        self.metrics.count(self.metrics.requests, (tenant, template, method, str(status)))
        self.metrics.observe(self.metrics.request_duration, (template, method), seconds)
        fields: dict[str, Any] = {
            "request_id": request_id,
            "client": self._client_ip(scope),
            "tenant": tenant or None,
            "method": method,
            "route": template,
            "status": status,
            "duration_ms": round(seconds * 1000, 2),
        }
        if "upstream_ms" in state:
            fields["upstream_ms"] = round(state["upstream_ms"], 2)
        if "task_id" in state:
            fields["task_id"] = state["task_id"]
        self.access_log.write(fields)


    def _client_ip(self, scope: Scope) -> str | None:
        """The peer, or, behind a trusted proxy, the nearest X-Forwarded-For hop not trusted."""
        peer = scope.get("client")
        ip = peer[0] if peer else None
        if not ip or not self.trusted_proxies or not self._trusted(ip):
            return ip
        for name, value in scope["headers"]:
            if name == b"x-forwarded-for":
                for hop in reversed([h.strip() for h in value.decode("latin-1").split(",")]):
                    if not self._trusted(hop):
                        return hop
        return ip

    def _trusted(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self.trusted_proxies)


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            if SAFE_REQUEST_ID.match(candidate):
                return candidate
            break
    return f"req_{secrets.token_hex(16)}"


def _declared_length(scope: Scope) -> int:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0
