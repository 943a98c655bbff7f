"""The one ASGI middleware: request id, body limit, rate headers, metrics, access log.

Pure ASGI (no BaseHTTPMiddleware) so streamed responses stay streamed and the cost per
request is a few dict operations. Routes leave what it needs in `scope["state"]`:
`tenant` (the metric label) and `rate` (the bucket info for the x-ratelimit headers).
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import GatewayError, error_response
from gateway.logs import ACCESS_LOGGER, log_fields
from gateway.metrics import Metrics
from gateway.quotas import rate_headers

SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
logger = logging.getLogger(ACCESS_LOGGER)


class GatewayMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics, max_body_bytes: int):
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.too_large = GatewayError(413, "request_too_large", f"The request body is larger than {max_body_bytes} bytes.")

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
                await self.app(scope, self._limited(receive), send_wrapper)
        finally:
            self._record(scope, state, request_id, status, time.perf_counter() - start)

    def _limited(self, receive: Receive) -> Receive:
        """Count body bytes as they arrive, for bodies sent without Content-Length; the
        route's exception handler renders the 413."""
        seen = 0

        async def wrapped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise self.too_large
            return message

        return wrapped

    def _record(self, scope: Scope, state: dict[str, Any], request_id: str, status: int, seconds: float) -> None:
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        method = scope["method"]
        tenant = state.get("tenant", "")
        self.metrics.requests.labels(tenant, template, method, str(status)).inc()
        self.metrics.request_duration.labels(template, method).observe(seconds)
        fields: dict[str, Any] = {
            "request_id": request_id,
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
        log_fields(logger, logging.INFO, fields)


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            if SAFE_REQUEST_ID.match(candidate):
                return candidate
            break
    return f"req_{uuid.uuid4().hex}"


def _declared_length(scope: Scope) -> int:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0
