"""Callbacks from the upstream: `POST /hooks/runway/{token}`."""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.errors import GatewayError, bad_request
from gateway.routes.common import json_response, services

# A relay task is small; the route is open to anyone until the token is checked, and
# server.max_body_bytes may be raised well above this for uploads.
MAX_CALLBACK_BYTES = 1024 * 1024


async def runway_callback(request: Request) -> Response:
    s = services(request)
    body = await _callback_body(request)
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        payload = None
    if payload is None and s.signer.read_callback_token(request.path_params["token"]) is not None:
        s.metrics.count(s.metrics.callbacks, ("invalid",))
        raise bad_request("invalid_json", "The callback body is not valid JSON.")
    result = await s.tasks.callback(request.path_params["token"], payload)
    return json_response({"ok": True, "result": result})


async def _callback_body(request: Request) -> bytes:
    """The body, refused (413) as soon as its declared or received length passes
    MAX_CALLBACK_BYTES, before the rest of it is read."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_CALLBACK_BYTES:
        raise _too_large()
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_CALLBACK_BYTES:
            raise _too_large()
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large() -> GatewayError:
    return GatewayError(413, "request_too_large", f"The callback body is larger than {MAX_CALLBACK_BYTES} bytes.")


routes = [Route("/hooks/runway/{token}", runway_callback, methods=["POST"])]
