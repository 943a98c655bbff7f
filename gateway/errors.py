"""One error type for the whole gateway, rendered as OpenAI-shaped JSON in one place.

Code anywhere raises `GatewayError`; `error_response` is the only thing that builds an
error body, so every route (and every middleware) answers in the same shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson
from starlette.responses import Response


@dataclass
class GatewayError(Exception):
    status: int
    code: str
    message: str
    type: str = ""
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.type:
            self.type = _default_type(self.status)
        super().__init__(self.message)


def _default_type(status: int) -> str:
    if status == 400 or status == 409 or status == 413:
        return "invalid_request_error"
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 404:
        return "invalid_request_error"
    if status == 429:
        return "rate_limit_error"
    return "api_error"


def error_body(err: GatewayError) -> bytes:
    return orjson.dumps({"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}})


def error_response(err: GatewayError) -> Response:
    return Response(error_body(err), status_code=err.status, headers=err.headers, media_type="application/json")


def bad_request(code: str, message: str, param: str | None = None) -> GatewayError:
    return GatewayError(400, code, message, "invalid_request_error", param)


def not_found(
    message: str = "No task with that id.", code: str = "task_not_found", param: str | None = "id"
) -> GatewayError:
    return GatewayError(404, code, message, "invalid_request_error", param)


class AuthFailure(GatewayError):
    """A 401 that also says why (the metric label), never echoing the credential."""

    def __init__(self, reason: str, message: str):
        super().__init__(401, "invalid_api_key", message, "invalid_request_error", None, {"www-authenticate": "Bearer"})
        self.reason = reason
