"""The steps every tenant route is made of, in request order: authenticate, admit, create
(once per Idempotency-Key), and the request's record of what happened (`RequestContext`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from ipaddress import IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway.auth import Principal
from gateway.errors import AuthFailure, GatewayError, bad_request
from gateway.gen2 import Gen2Request
from gateway.idempotency import fingerprint, idempotency_key, run_idempotent
from gateway.middleware import RequestContext, client_ip, request_context
from gateway.quotas import refused
from gateway.services import Services
from gateway.store.base import Admission, KeyLimits, TaskRecord
from gateway.tasks import Created, CreateFailed
from gateway.uploads import PendingUpload

PERMISSION = "permission_error"


def services(request: Request) -> Services:
    """The app's services, built in its lifespan (`gateway.app`)."""
    built: Services = request.app.state.services
    return built


def context(request: Request) -> RequestContext:
    """This request's record, read by the middleware for headers, metrics and the log line."""
    return request_context(request.scope)


def authenticate(request: Request, scope: str) -> Principal:
    """The caller, if its credential is valid, its key may be used from the client's
    network, and its key has `scope` (create, read or delete: contract §15)."""
    s = services(request)
    try:
        principal = s.auth.authenticate(request.headers.get("authorization"))
    except AuthFailure as failure:
        s.metrics.count(s.metrics.auth_failures, (failure.reason,))
        raise
    except GatewayError:
        s.metrics.count(s.metrics.auth_failures, ("tenant_disabled",))
        raise
    record = context(request)
    record.tenant, record.key_id = principal.tenant.id, principal.key_id
    key = principal.key
    if key is not None and key.networks is not None:
        ip = client_ip(request.scope, s.config.server.trusted_proxies)
        if not in_networks(ip, key.networks):
            s.metrics.count(s.metrics.auth_failures, ("network",))
            raise GatewayError(403, "permission_denied", "This API key is not allowed from this network.", PERMISSION)
    if key is not None and key.scopes is not None and scope not in key.scopes:
        raise GatewayError(
            403, "permission_denied", f"This API key does not have the `{scope}` scope this request needs.", PERMISSION
        )
    if principal.key_id is not None:
        s.last_used.note(principal.key_id, s.clock())
    return principal


def in_networks(ip: str | None, networks: tuple[IPv4Network | IPv6Network, ...]) -> bool:
    """Whether the client address lies in one of a key's allowed networks (an unknown or
    unparsable address lies in none)."""
    try:
        addr = ip_address(ip or "")
    except ValueError:
        return False
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1
    return any(addr in net for net in networks)


def key_limits(principal: Principal) -> KeyLimits | None:
    """The caller's key's own limits (None: a JWT, a config key, or a key without limits)."""
    return principal.key.limits if principal.key is not None else None


async def admit_request(request: Request, principal: Principal) -> None:
    """One token of requests_per_minute (the tenant's and the key's); a 429 changes nothing."""
    s = services(request)
    tenant = principal.tenant
    admission = await s.store.take_request(tenant.id, tenant.limits, s.clock(), key_limits(principal))
    _admitted(request, principal, admission)


def _admitted(request: Request, principal: Principal, admission: Admission) -> None:
    """Record the rate headers' source; raise the 429 of a refusal."""
    if not admission.ok:
        raise refused(admission, principal.tenant, services(request).metrics, key_limits(principal))
    context(request).rate = admission.rate


async def tenant_request(request: Request, scope: str) -> Principal:
    principal = authenticate(request, scope)
    await admit_request(request, principal)
    return principal


async def own_task(request: Request, task_id: str) -> TaskRecord | None:
    """A status read: authenticate, take a requests_per_minute token and read the tenant's
    task, the last two in one store operation (a poll is the most frequent request)."""
    s = services(request)
    principal = authenticate(request, "read")
    tenant = principal.tenant
    admission, record = await s.store.read_task(tenant.id, tenant.limits, task_id, s.clock(), key_limits(principal))
    _admitted(request, principal, admission)
    if record is not None:
        context(request).task_id = record.task_id
    return record


async def submit_task(
    request: Request,
    principal: Principal,
    req: Gen2Request,
    meta: dict[str, Any] | None = None,
    upload: PendingUpload | None = None,
) -> Created:
    """admit -> rewrite -> forward -> record (`TaskService.create`), and note on the
    request's context what the create learned, also when the upstream failed it."""
    ctx = context(request)
    try:
        created = await services(request).tasks.create(
            principal.tenant,
            req,
            ctx.request_id,
            meta,
            upload,
            principal.key_id,
            ctx.idempotency_key,
            key_limits(principal),
        )
    except CreateFailed as failed:
        ctx.rate, ctx.upstream_ms = failed.rate, failed.upstream_ms
        ctx.relay, ctx.relay_attempts = failed.relay, failed.relay_attempts
        raise
    ctx.rate, ctx.upstream_ms, ctx.task_id = created.rate, created.upstream_ms, created.task["id"]
    ctx.relay, ctx.relay_attempts = created.relay, created.relay_attempts
    return created


async def create_once(
    request: Request,
    principal: Principal,
    route: str,
    body: Callable[[], Any],
    create: Callable[[], Awaitable[Response]],
    render_task: Callable[[TaskRecord], Response],
) -> Response:
    """Run the route's `create` once per Idempotency-Key (without a key, just run it).
    `body` gives what identifies the request (`fingerprint`); `render_task` is the route's
    200 answer for a task, for a key bound to a create whose outcome was unknown."""
    key = idempotency_key(request.headers)
    if key is None:
        return await create()
    context(request).idempotency_key = key  # admission records its reservation on the key
    s = services(request)
    return await run_idempotent(
        s.store,
        principal.tenant.id,
        key,
        fingerprint(route, body()),
        s.config.create_seconds,
        lambda: admit_request(request, principal),
        create,
        render_task,
        s.clock,
    )


async def read_json(request: Request) -> Any:
    body = await request.body()
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise bad_request("invalid_json", "The request body is not valid JSON.") from None


def parsed_or_raw(body: bytes) -> Any:
    """The body for an idempotency fingerprint: parsed JSON, or the raw bytes' hex when it
    does not parse (so a repeat of the same broken body replays its 400)."""
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
