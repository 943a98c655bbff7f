"""Steps every tenant route starts with: authenticate, then admit the request."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway.auth import AuthFailure, Principal
from gateway.errors import GatewayError, bad_request
from gateway.quotas import quota_error
from gateway.store.base import Admission, TaskRecord

if TYPE_CHECKING:
    from gateway.app import Gateway


def gateway(request: Request) -> "Gateway":
    return request.app.state.gateway


def authenticate(request: Request) -> Principal:
    gw = gateway(request)
    try:
        principal = gw.auth.authenticate(request.headers.get("authorization"))
    except AuthFailure as failure:
        gw.metrics.auth_failures.labels(failure.reason).inc()
        raise
    except GatewayError:
        gw.metrics.auth_failures.labels("tenant_disabled").inc()
        raise
    request.scope["state"]["tenant"] = principal.tenant.id
    return principal


async def admit_request(request: Request, principal: Principal) -> None:
    """One token of requests_per_minute; a 429 changes nothing."""
    gw = gateway(request)
    tenant = principal.tenant
    _admitted(request, principal, await gw.store.take_request(tenant.id, tenant.limits, gw.clock()))


def _admitted(request: Request, principal: Principal, admission: Admission) -> None:
    """Record the rate headers' source; raise the 429 of a refusal."""
    request.scope["state"]["rate"] = admission.rate
    if not admission.ok:
        tenant = principal.tenant
        gateway(request).metrics.quota_rejections.labels(tenant.id, admission.limit).inc()
        raise quota_error(admission, tenant.limits.requests_per_minute)


async def tenant_request(request: Request) -> Principal:
    principal = authenticate(request)
    await admit_request(request, principal)
    return principal


async def own_task(request: Request, task_id: str) -> TaskRecord | None:
    """A status read: authenticate, take a requests_per_minute token and read the tenant's
    task, the last two in one store operation (a poll is the most frequent request)."""
    gw = gateway(request)
    principal = authenticate(request)
    tenant = principal.tenant
    admission, record = await gw.store.read_task(tenant.id, tenant.limits, task_id, gw.clock())
    _admitted(request, principal, admission)
    if record is not None:
        request.scope["state"]["task_id"] = record.task_id
    return record


async def read_json(request: Request) -> Any:
    body = await request.body()
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise bad_request("invalid_json", "The request body is not valid JSON.") from None


async def parsed_or_raw(request: Request) -> Any:
    """The body for an idempotency fingerprint: parsed JSON, or the raw bytes' hex when it
    does not parse (so a repeat of the same broken body replays its 400)."""
    body = await request.body()
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return {"raw": body.hex()}


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status_code=status, headers=headers, media_type="application/json")


def page_limit(request: Request, default: int = 20, maximum: int = 100) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise bad_request("invalid_value", "`limit` must be an integer.", "limit") from None
    if not 1 <= value <= maximum:
        raise bad_request("invalid_value", f"`limit` must be between 1 and {maximum}.", "limit")
    return value
