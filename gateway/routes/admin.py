"""Operator routes under /admin: the admin API v1 (tenants, keys, audit trail, webhook
deliveries) and the older usage read. Every change is one store operation that also
appends its audit entry; this process's directory then takes it before the answer is sent
(`DirectoryCache.apply_own_change`), so a key minted here works here at once."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway import admin, usage
from gateway.admin import ACTIONS, AdminKey, AdminTenant, AdminView, AuditContext, page
from gateway.auth import key_hash
from gateway.errors import AuthFailure, GatewayError, bad_request, not_found
from gateway.keygen import new_key, new_key_id, new_webhook_secret
from gateway.middleware import client_ip
from gateway.routes.common import context, json_response, page_limit, read_json, services
from gateway.store.base import WEBHOOK_STATES, KeyRecord, Limits

PAGE_DEFAULT, PAGE_MAX = 100, 1000
SECRET_HEADERS = {"cache-control": "no-store"}  # an answer carrying a secret: kept by no cache


def _require_admin(request: Request) -> AuditContext:
    """The caller, if an admin (401 without a credential or with an unknown one, 403 with a
    tenant's), and what the audit entries of its changes record."""
    s = services(request)
    try:
        actor = admin.authenticate_admin(s.directory.current, request.headers.get("authorization"), s.auth)
    except AuthFailure as failure:
        s.metrics.count(s.metrics.auth_failures, (failure.reason,))
        raise admin.unauthenticated(failure.message) from None
    except GatewayError as err:
        s.metrics.count(s.metrics.auth_failures, ("not_admin" if err.status == 403 else "unknown_key",))
        raise
    return AuditContext(actor, context(request).request_id, client_ip(request.scope, s.config.server.trusted_proxies))


def _directory(request: Request) -> AdminView:
    s = services(request)
    return AdminView(s.config, s.store)


async def _body(request: Request) -> Any:
    """The JSON body; an empty one is `{}` (a rotation's fields are all optional)."""
    if not await request.body():
        return {}
    return await read_json(request)


def _limit(request: Request) -> int:
    return page_limit(request, PAGE_DEFAULT, PAGE_MAX)


# --- tenants ---------------------------------------------------------------------------


async def list_tenants(request: Request) -> Response:
    _require_admin(request)
    limit, after = _limit(request), request.query_params.get("after")
    tenants = [t for t in await _directory(request).tenants() if after is None or t.id > after]
    return json_response(page([t.to_json() for t in tenants[: limit + 1]], limit))


async def create_tenant(request: Request) -> Response:
    audit = _require_admin(request)
    s = services(request)
    now = s.clock()
    record = admin.tenant_create(await _body(request), now, _relay_ids(request))
    conflict = GatewayError(409, "tenant_exists", f"A tenant with id {record.id!r} exists.", param="id")
    if s.config.tenant(record.id) is not None:
        raise conflict
    record.webhook_secret = new_webhook_secret()
    created = AdminTenant.from_record(record)
    changes = {k: v for k, v in created.to_json().items() if k in ("name", "enabled", "limits", "policy")}
    if not await s.store.create_tenant(record, audit.entry("tenant.create", now, record.id, changes=changes)):
        raise conflict
    await s.directory.apply_own_change()
    return json_response({**created.to_json(), "webhook_secret": record.webhook_secret}, 201, SECRET_HEADERS)


async def show_tenant(request: Request) -> Response:
    _require_admin(request)
    s = services(request)
    tenant = await _directory(request).tenant(request.path_params["id"])
    usage = await s.store.usage(tenant.id, s.clock())
    return json_response({**tenant.to_json(), "usage": asdict(usage)})


async def update_tenant(request: Request) -> Response:
    audit = _require_admin(request)
    s = services(request)
    tenant = await _directory(request).api_tenant(request.path_params["id"])
    changes = admin.tenant_changes(await _body(request), _relay_ids(request))
    if not changes:
        return json_response(tenant.to_json())
    now = s.clock()
    record = await s.store.update_tenant(
        tenant.id, changes, now, audit.entry("tenant.update", now, tenant.id, changes=changes)
    )
    if record is None:
        raise not_found(f"No tenant with id {tenant.id!r}.", "tenant_not_found", "id")
    await s.directory.apply_own_change()
    return json_response(AdminTenant.from_record(record).to_json())


async def rotate_webhook_secret(request: Request) -> Response:
    """A new webhook secret; the old one still signs deliveries for `grace_seconds`."""
    audit = _require_admin(request)
    s = services(request)
    directory = _directory(request)
    tenant = await directory.api_tenant(request.path_params["id"])
    grace = admin.grace_seconds(await _body(request))
    now, secret = s.clock(), new_webhook_secret()
    entry = audit.entry("tenant.webhook_secret.rotate", now, tenant.id, changes={"grace_seconds": grace})
    record = await s.store.rotate_webhook_secret(tenant.id, secret, now + grace if grace else None, now, entry)
    if record is None:
        raise not_found(f"No tenant with id {tenant.id!r}.", "tenant_not_found", "id")
    await s.directory.apply_own_change()
    return json_response({**AdminTenant.from_record(record).to_json(), "webhook_secret": secret}, 200, SECRET_HEADERS)


# --- keys ------------------------------------------------------------------------------


async def list_tenant_keys(request: Request) -> Response:
    _require_admin(request)
    limit = _limit(request)
    keys = await _directory(request).keys(request.path_params["id"])
    start = admin.after_index([k.id for k in keys], request.query_params.get("after"))
    return json_response(page([k.to_json() for k in keys[start : start + limit + 1]], limit))


async def create_key(request: Request) -> Response:
    """Mint a key: its secret is in this answer and nowhere else (the store keeps its hash)."""
    audit = _require_admin(request)
    s = services(request)
    tenant = await _directory(request).tenant(request.path_params["id"])
    now = s.clock()
    body = await _body(request)
    name, expires_at = admin.key_create(body, now)
    access = admin.key_access(body)
    limits = {k: v for k, v in access.get("limits", {}).items() if v is not None}
    secret = new_key()
    record = KeyRecord(
        id=new_key_id(),
        tenant_id=tenant.id,
        name=name,
        prefix=secret[:10],
        secret_hash=key_hash(secret),
        created_at=now,
        expires_at=expires_at,
        limits=Limits(**limits),
        scopes=access.get("scopes"),
        allowed_cidrs=access.get("allowed_cidrs"),
    )
    changes = {"name": name, "expires_at": expires_at, **_logged_access(access)}
    await s.store.create_key(record, audit.entry("key.create", now, tenant.id, record.id, changes))
    await s.directory.apply_own_change()
    return json_response({**AdminKey.from_record(record).to_json(), "secret": secret}, 201, SECRET_HEADERS)


async def show_key(request: Request) -> Response:
    """The key, with its `usage` next to its limits (contract §15)."""
    _require_admin(request)
    s = services(request)
    key = await _directory(request).key(request.path_params["key_id"])
    key_usage = await usage.key_usage(s.store, key.id, s.clock())
    return json_response({**key.to_json(), "usage": asdict(key_usage)})


async def update_key(request: Request) -> Response:
    audit = _require_admin(request)
    s = services(request)
    key = await _directory(request).api_key(request.path_params["key_id"])
    now = s.clock()
    changes = admin.key_changes(await _body(request), now)
    if not changes:
        return json_response(AdminKey.from_record(key).to_json())
    entry = audit.entry("key.update", now, key.tenant_id, key.id, _logged_access(changes))
    return await _change_key(request, key, changes, entry)


def _logged_access(changes: dict[str, Any]) -> dict[str, Any]:
    """Changes as the audit entry records them (JSON: lists, not tuples)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in changes.items()}


async def rotate_key(request: Request) -> Response:
    """A new secret for the same key id; the old one works for `grace_seconds` more."""
    audit = _require_admin(request)
    s = services(request)
    key = await _directory(request).api_key(request.path_params["key_id"])
    grace = admin.grace_seconds(await _body(request))
    now, secret = s.clock(), new_key()
    grace_until = now + grace if grace else None
    logged = {"grace_seconds": grace, "previous_secret_expires_at": admin.unix_time(grace_until)}
    entry = audit.entry("key.rotate", now, key.tenant_id, key.id, logged)
    record = await s.store.rotate_key(key.id, key_hash(secret), secret[:10], grace_until, now, entry)
    if record is not None and record.revoked_at is not None:  # refused, nothing written
        raise GatewayError(409, "key_revoked", f"Key {key.id!r} is revoked: mint a new one.", param="key_id")
    await s.directory.apply_own_change()
    return _key_response(key.id, record, secret)


async def revoke_key(request: Request) -> Response:
    """Revoke (idempotent): a key already revoked is answered as it is, with no new entry.
    The store decides, in one step, so simultaneous revocations write one entry."""
    audit = _require_admin(request)
    s = services(request)
    key = await _directory(request).api_key(request.path_params["key_id"])
    now = s.clock()
    entry = audit.entry("key.revoke", now, key.tenant_id, key.id, {"revoked_at": admin.unix_time(now)})
    record = await s.store.revoke_key(key.id, now, entry)
    await s.directory.apply_own_change()
    return _key_response(key.id, record)


async def _change_key(request: Request, key: KeyRecord, changes: dict[str, Any], entry: Any) -> Response:
    s = services(request)
    record = await s.store.update_key(key.id, changes, entry)
    await s.directory.apply_own_change()
    return _key_response(key.id, record)


def _key_response(key_id: str, record: KeyRecord | None, secret: str | None = None) -> Response:
    """The key as stored after a change (with its new secret after a rotation); 404 when
    it is gone."""
    if record is None:
        raise not_found(f"No key with id {key_id!r}.", "key_not_found", "key_id")
    body = AdminKey.from_record(record).to_json()
    return json_response({**body, "secret": secret}, 200, SECRET_HEADERS) if secret else json_response(body)


# --- audit trail -----------------------------------------------------------------------


async def list_audit(request: Request) -> Response:
    _require_admin(request)
    q = request.query_params
    action = q.get("action")
    if action is not None and action not in ACTIONS:
        raise bad_request("invalid_value", f"`action` must be one of {', '.join(ACTIONS)}.", "action")
    limit = _limit(request)
    entries, has_more = await services(request).store.list_audit(
        limit=limit, after=q.get("after"), tenant=q.get("tenant"), action=action
    )
    return json_response({"object": "list", "data": [admin.audit_json(e) for e in entries], "has_more": has_more})


# --- webhook deliveries ----------------------------------------------------------------


async def list_webhooks(request: Request) -> Response:
    """Undelivered events (pending and dead), newest first: what an operator redelivers."""
    _require_admin(request)
    q = request.query_params
    state = q.get("status")
    if state is not None and state not in WEBHOOK_STATES:
        raise bad_request("invalid_value", f"`status` must be one of {', '.join(WEBHOOK_STATES)}.", "status")
    limit = _limit(request)
    events, has_more = await services(request).store.list_webhooks(
        limit=limit, after=q.get("after"), state=state, tenant=q.get("tenant")
    )
    return json_response(
        {"object": "list", "data": [admin.webhook_event_json(e) for e in events], "has_more": has_more}
    )


async def redeliver_webhook(request: Request) -> Response:
    """Queue a dead event again (attempts reset, before its task's later events) -> 202.
    The store names the event's tenant in the audit entry, in the same step."""
    audit = _require_admin(request)
    s = services(request)
    event_id, now = request.path_params["event_id"], s.clock()
    entry = audit.entry("webhook.redeliver", now, None, changes={"event_id": event_id})
    result = await s.store.redeliver_webhook(event_id, now, entry)
    if result is None:
        raise not_found(f"No undelivered webhook event with id {event_id!r}.", "webhook_event_not_found", "event_id")
    event, redelivered = result
    if not redelivered:
        raise GatewayError(
            409,
            "webhook_event_not_dead",
            f"Webhook event {event_id!r} is {event.state}, not dead: it is still being delivered.",
            param="event_id",
        )
    return json_response(admin.webhook_event_json(event), 202)


# --- the usage ledger ------------------------------------------------------------------


async def usage_report(request: Request) -> Response:
    """The usage ledger (contract §10): rows per UTC day, tenant and key between `from`
    and `to`, summed by `group_by`, as JSON or (`format=csv`) CSV with the same rows."""
    _require_admin(request)
    s = services(request)
    query = usage.parse_query(request.query_params, s.clock())
    ledger = await s.store.ledger(query.from_day, query.to_day, query.tenant, query.key_id)
    rows = usage.group(ledger, query.group_by, s.relays.default_id)
    if query.format == "csv":
        return Response(usage.to_csv(rows, query), media_type="text/csv")
    return json_response({"object": "list", "data": rows, "has_more": False})


# --- the relays ------------------------------------------------------------------------


def _relay_ids(request: Request) -> list[str]:
    """The relays a tenant's `policy.relays` may name: the configured ones."""
    return [relay.id for relay in services(request).config.relay_list]


async def list_relays(request: Request) -> Response:
    """Every configured relay as this process sees it (contract §14): state, the time it
    ends (open or cooling), its keys' health, its last error; never a key."""
    _require_admin(request)
    s = services(request)
    return json_response({"object": "list", "data": s.relays.view(s.clock())})


# --- the older usage read --------------------------------------------------------------


async def tenant_usage(request: Request) -> Response:
    """Limits and current usage of one tenant (UTC day and month)."""
    _require_admin(request)
    s = services(request)
    try:
        tenant = await _directory(request).tenant(request.path_params["tenant"])
    except GatewayError:
        raise not_found("No such tenant.", "tenant_not_found", "tenant") from None
    usage = await s.store.usage(tenant.id, s.clock())
    return json_response(
        {"tenant": tenant.id, "enabled": tenant.enabled, "limits": asdict(tenant.limits), "usage": asdict(usage)}
    )


V1 = "/admin/v1"
routes = [
    Route("/admin/tenants/{tenant}/usage", tenant_usage, methods=["GET"]),
    Route(f"{V1}/tenants", list_tenants, methods=["GET"]),
    Route(f"{V1}/tenants", create_tenant, methods=["POST"]),
    Route(f"{V1}/tenants/{{id}}", show_tenant, methods=["GET"]),
    Route(f"{V1}/tenants/{{id}}", update_tenant, methods=["PATCH"]),
    Route(f"{V1}/tenants/{{id}}/webhook-secret", rotate_webhook_secret, methods=["POST"]),
    Route(f"{V1}/tenants/{{id}}/keys", list_tenant_keys, methods=["GET"]),
    Route(f"{V1}/tenants/{{id}}/keys", create_key, methods=["POST"]),
    Route(f"{V1}/keys/{{key_id}}", show_key, methods=["GET"]),
    Route(f"{V1}/keys/{{key_id}}", update_key, methods=["PATCH"]),
    Route(f"{V1}/keys/{{key_id}}", revoke_key, methods=["DELETE"]),
    Route(f"{V1}/keys/{{key_id}}/rotate", rotate_key, methods=["POST"]),
    Route(f"{V1}/audit", list_audit, methods=["GET"]),
    Route(f"{V1}/webhooks", list_webhooks, methods=["GET"]),
    Route(f"{V1}/webhooks/{{event_id}}/redeliver", redeliver_webhook, methods=["POST"]),
    Route(f"{V1}/usage", usage_report, methods=["GET"]),
    Route(f"{V1}/relays", list_relays, methods=["GET"]),
]
