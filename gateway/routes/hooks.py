"""Callbacks from the upstream: `POST /hooks/runway/{token}`."""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.errors import bad_request
from gateway.routes.common import json_response, services


async def runway_callback(request: Request) -> Response:
    s = services(request)
    body = await request.body()
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        payload = None
    if payload is None and s.signer.read_callback_token(request.path_params["token"]) is not None:
        s.metrics.count(s.metrics.callbacks, ("invalid",))
        raise bad_request("invalid_json", "The callback body is not valid JSON.")
    result = await s.tasks.callback(request.path_params["token"], payload)
    return json_response({"ok": True, "result": result})


routes = [Route("/hooks/runway/{token}", runway_callback, methods=["POST"])]
