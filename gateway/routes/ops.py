"""Operations routes: liveness, readiness, metrics, and the API description."""

from __future__ import annotations

import asyncio
import hmac

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.auth import bearer_credential
from gateway.errors import GatewayError
from gateway.metrics import CONTENT_TYPE
from gateway.openapi import document_bytes
from gateway.routes.common import json_response, services

READY_TIMEOUT = 1.0


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Ready means the store answers: only that takes this replica out of the rotation.
    The upstream's state (circuit, refused keys) is reported in the body but does not
    fail readiness: it is the same for every replica, so failing them all would turn a
    clear 502/503 into no answer at all, and status reads need no upstream."""
    s = services(request)
    upstream = s.relays.readiness()
    try:
        # a write, not only an answer: a Redis demoted by a failover still answers reads
        await asyncio.wait_for(s.store.ping(), READY_TIMEOUT)
    except Exception:
        # OpenAI-shaped like every error, plus the probe's own fields
        error = {
            "message": "The store cannot answer or take writes.",
            "type": "api_error",
            "param": None,
            "code": "store_unavailable",
        }
        return json_response({"error": error, "status": "unavailable", "store": "unavailable", **upstream}, status=503)
    return json_response({"status": "ok", "store": "ok", **upstream})


async def metrics(request: Request) -> Response:
    s = services(request)
    token = s.config.metrics_bearer_token
    if token:
        given = bearer_credential(request.headers.get("authorization")) or ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise GatewayError(
                401,
                "invalid_api_key",
                "Metrics need the configured bearer token.",
                "authentication_error",
                None,
                {"www-authenticate": "Bearer"},
            )
    s.relays.export()
    body = await s.metrics.render(s.store, s.tenant_limits, s.clock())
    return Response(body, media_type=CONTENT_TYPE)


async def openapi(request: Request) -> Response:
    """The OpenAPI 3.1 document (`gateway.openapi`), without authentication: it describes
    the API, it holds no tenant's data."""
    return Response(document_bytes(), media_type="application/json")


routes = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
]
