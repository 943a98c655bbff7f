"""The admin API's model: who is calling, the tenants and keys as the API shows them
(config ones merged with the store's), the checks on what a caller sends, and the audit
entries a change writes.

The routes (`gateway.routes.admin`) only read requests and call these; nothing here
renders a secret or a hash: a secret appears once, added by the route that made it.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
import re
from collections.abc import Collection
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from gateway.auth import Authenticator, bearer_credential, key_hash
from gateway.config import TENANT_ID_RE, Config, ConfigError, Tenant, parse_policy
from gateway.directory import Directory, config_key_id, merge_tenants
from gateway.errors import AuthFailure, GatewayError, bad_request, not_found
from gateway.jsontypes import is_type
from gateway.keygen import admin_actor_id, new_audit_id
from gateway.store.base import ALL_LIMITS, SCOPES, AuditEntry, KeyRecord, Limits, OutboxEntry, Store, TenantRecord

MAX_LIMIT = 2**63 - 1  # a limit is a signed 64-bit integer in both stores
MAX_NAME = 200
# Refused anywhere in a name (regex class text, shared with the OpenAPI pattern): C0, DEL
# and C1 controls, the line and paragraph separators, and the bidi embeddings, overrides
# and isolates (U+202E would show `gpj.exe` as `exe.jpg` in every table).
NAME_REFUSED = r"\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069"
NAME_INVISIBLE = r"\u200b-\u200d\u2060\ufeff"  # zero-width: allowed inside, never the whole name
CONTROL_RE = re.compile(f"[{NAME_REFUSED}]")
VISIBLE_RE = re.compile(f"[^\\s{NAME_REFUSED}{NAME_INVISIBLE}]")
DEFAULT_GRACE_SECONDS = 86400
MAX_SECONDS = 100 * 365 * 86400  # grace periods and key lifetimes: at most a century
MAX_CIDRS = 100  # a key's allowed_cidrs
KEY_ACCESS = ("limits", "scopes", "allowed_cidrs")  # a key's own limits, scopes, networks (§15)
ACTIONS = (
    "tenant.create",
    "tenant.update",
    "tenant.webhook_secret.rotate",
    "key.create",
    "key.update",
    "key.rotate",
    "key.revoke",
    "webhook.redeliver",
    "config.reload",
)


# --- who is calling --------------------------------------------------------------------


@dataclass(frozen=True)
class Actor:
    """An authenticated admin, as the audit trail names it."""

    type: str  # admin_key | jwt
    id: str


def unauthenticated(message: str) -> GatewayError:
    return GatewayError(401, "invalid_api_key", message, "authentication_error", None, {"www-authenticate": "Bearer"})


def authenticate_admin(directory: Directory, authorization: str | None, tenants: Authenticator) -> Actor:
    """An admin: a key whose hash is in `[admin] keys`, or a JWT accepted by `[auth.jwt]`
    whose claim `[admin] jwt_claim` holds `[admin] jwt_role`. A tenant's valid credential
    (recognised by the tenant authenticator) is 403, anything else 401."""
    config = directory.config
    credential = bearer_credential(authorization)
    if credential is None:
        raise unauthenticated("An admin key is required: send `Authorization: Bearer <admin key>`.")
    hashed = key_hash(credential)
    for configured in config.admin_keys:
        if hmac.compare_digest(hashed, configured):
            return Actor("admin_key", admin_actor_id(configured))
    if directory.jwt is not None and credential.count(".") == 2:
        claims = directory.jwt.verify(credential)  # AuthFailure: 401
        if _has_role(claims.get(config.admin_jwt_claim), config.admin_jwt_role):
            return Actor("jwt", str(claims.get("sub") or ""))
    try:
        tenants.authenticate(authorization)
    except AuthFailure:
        raise unauthenticated("Incorrect admin key provided.") from None
    except GatewayError:
        pass  # a disabled tenant's credential: still a tenant's, not an admin's
    raise GatewayError(403, "permission_denied", "This credential is not an admin's.", "permission_error")


def _has_role(value: Any, role: str) -> bool:
    """The role claim as a list of roles or a space-separated string of them."""
    if isinstance(value, str):
        return role in value.split()
    return isinstance(value, list) and role in value


# --- the objects -----------------------------------------------------------------------


def unix_time(t: float | None) -> int | None:
    """Times are integer Unix seconds, rounded up (an expiry is never shown early)."""
    return None if t is None else math.ceil(t)


@dataclass(frozen=True)
class AdminTenant:
    """A tenant as the admin API shows it, from the config or the store."""

    id: str
    name: str
    enabled: bool
    limits: Limits
    policy: dict[str, Any]
    source: str  # config | api
    created_at: float | None = None
    updated_at: float | None = None

    @classmethod
    def from_config(cls, t: Tenant) -> AdminTenant:
        policy: dict[str, Any] = {
            "force": t.policy.force,
            "defaults": t.policy.defaults,
            "hook_hosts": list(t.policy.hook_hosts),
        }
        if t.policy.relays:  # shown when the tenant is kept to some relays (§14)
            policy["relays"] = list(t.policy.relays)
        return cls(t.id, t.id, t.enabled, t.limits, policy, "config")

    @classmethod
    def from_record(cls, r: TenantRecord) -> AdminTenant:
        policy = {"force": {}, "defaults": {}, "hook_hosts": [], **r.policy}
        return cls(r.id, r.name or r.id, r.enabled, r.limits, policy, "api", r.created_at, r.updated_at)

    def to_json(self) -> dict[str, Any]:
        return {
            "object": "tenant",
            "id": self.id,
            "name": self.name,
            "enabled": self.enabled,
            "source": self.source,
            "limits": asdict(self.limits),
            "policy": self.policy,
            "created_at": unix_time(self.created_at),
            "updated_at": unix_time(self.updated_at),
        }


@dataclass(frozen=True)
class AdminKey:
    """An API key as the admin API shows it: never its secret or hash."""

    id: str
    tenant: str
    name: str | None
    prefix: str | None
    source: str
    created_at: float | None = None
    expires_at: float | None = None
    last_used_at: float | None = None
    revoked_at: float | None = None
    previous_secret_expires_at: float | None = None
    limits: Limits = field(default_factory=Limits)  # §15: a config key has none, all scopes, anywhere
    scopes: tuple[str, ...] | None = None
    allowed_cidrs: tuple[str, ...] | None = None

    @classmethod
    def from_config(cls, tenant_id: str, configured_hash: str, last_used_at: float | None = None) -> AdminKey:
        return cls(config_key_id(configured_hash), tenant_id, None, None, "config", last_used_at=last_used_at)

    @classmethod
    def from_record(cls, r: KeyRecord) -> AdminKey:
        graces = [*r.earlier_hashes.values(), *([r.previous_expires_at] if r.previous_hash else [])]
        previous = max((t for t in graces if t is not None), default=None)  # when the last old secret stops
        return cls(
            r.id,
            r.tenant_id,
            r.name,
            r.prefix,
            "api",
            r.created_at,
            r.expires_at,
            r.last_used_at,
            r.revoked_at,
            previous,
            r.limits,
            r.scopes,
            r.allowed_cidrs,
        )

    def to_json(self) -> dict[str, Any]:
        """The key; `scopes` as in force (all three when none were set), `allowed_cidrs`
        null for anywhere."""
        times = ("created_at", "expires_at", "last_used_at", "revoked_at", "previous_secret_expires_at")
        body: dict[str, Any] = {"object": "api_key"}
        for f in fields(self):
            value = getattr(self, f.name)
            body[f.name] = unix_time(value) if f.name in times else value
        body["limits"] = asdict(self.limits)
        body["scopes"] = list(self.scopes if self.scopes is not None else SCOPES)
        body["allowed_cidrs"] = list(self.allowed_cidrs) if self.allowed_cidrs is not None else None
        return body


def webhook_event_json(e: OutboxEntry) -> dict[str, Any]:
    """A webhook event as the admin API shows it (contract §10): where its delivery stands,
    never its URL or body."""
    return {
        "object": "webhook_event",
        "id": e.event_id,
        "tenant": e.tenant_id,
        "task_id": e.task_id,
        "status": e.state,
        "attempts": e.attempts,
        "next_attempt_at": unix_time(e.next_at),
        "last_error": e.last_error,
        "created_at": unix_time(e.created_at),
    }


def audit_json(e: AuditEntry) -> dict[str, Any]:
    target = {k: v for k, v in (("tenant", e.tenant), ("key_id", e.key_id)) if v is not None}
    return {
        "object": "audit_event",
        "id": e.id,
        "time": unix_time(e.time),
        "actor": {"type": e.actor_type, "id": e.actor_id},
        "action": e.action,
        "target": target,
        "changes": e.changes,
        "request_id": e.request_id,
        "ip": e.ip,
    }


def page(items: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    """A list answer from up to limit + 1 items (the extra one says there is more)."""
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit}


def after_index(ids: list[str], after: str | None) -> int:
    """Where the page after the id `after` starts in an ordered list of ids."""
    if after is None:
        return 0
    try:
        return ids.index(after) + 1
    except ValueError:
        raise bad_request("invalid_value", f"No item with id {after!r} in this list.", "after") from None


# --- the directory as the admin sees it ------------------------------------------------


@dataclass
class AdminView:
    """Config tenants and keys merged with the store's, read from the store for one admin
    request (not from the in-memory directory: an admin reads its own writes at once)."""

    config: Config
    store: Store

    async def tenants(self) -> list[AdminTenant]:
        """Every tenant by id ascending; a config tenant hides a stored one of the same id."""
        merged = merge_tenants(self.config, (await self.store.load_directory()).tenants)
        return [_admin_tenant(merged[k]) for k in sorted(merged)]

    async def tenant(self, tenant_id: str) -> AdminTenant:
        record = await self.store.get_tenant(tenant_id) if TENANT_ID_RE.match(tenant_id) else None
        tenant = merge_tenants(self.config, [record] if record else []).get(tenant_id)
        if tenant is None:
            raise not_found(f"No tenant with id {tenant_id!r}.", "tenant_not_found", "id")
        return _admin_tenant(tenant)

    async def api_tenant(self, tenant_id: str) -> AdminTenant:
        """A tenant the API may change: 409 for a config one, 404 for an unknown one."""
        tenant = await self.tenant(tenant_id)
        if tenant.source == "config":
            raise GatewayError(
                409,
                "tenant_managed_by_config",
                f"Tenant {tenant_id!r} is defined in the config file: change it there and reload.",
                param="id",
            )
        return tenant

    async def keys(self, tenant_id: str) -> list[AdminKey]:
        """A tenant's keys newest first, its config keys after its API keys."""
        await self.tenant(tenant_id)
        stored = [AdminKey.from_record(k) for k in await self.store.list_keys(tenant_id)]
        configured = self.config.tenant(tenant_id)
        hashes = configured.keys if configured else ()
        used = await self.store.config_key_uses([config_key_id(h) for h in hashes])
        return stored + [AdminKey.from_config(tenant_id, h, used.get(config_key_id(h))) for h in hashes]

    async def key(self, key_id: str) -> AdminKey:
        for t in self.config.tenants:
            for h in t.keys:
                if config_key_id(h) == key_id:
                    used = await self.store.config_key_uses([key_id])
                    return AdminKey.from_config(t.id, h, used.get(key_id))
        record = await self.store.get_key(key_id) if key_id.startswith("key_") else None
        if record is None:
            raise not_found(f"No key with id {key_id!r}.", "key_not_found", "key_id")
        return AdminKey.from_record(record)

    async def api_key(self, key_id: str) -> KeyRecord:
        """A key the API may change: 409 for a config one, 404 for an unknown one."""
        if (await self.key(key_id)).source == "config":
            raise GatewayError(
                409,
                "key_managed_by_config",
                f"Key {key_id!r} is listed in the config file: remove it there and reload.",
                param="key_id",
            )
        record = await self.store.get_key(key_id)
        if record is None:
            raise not_found(f"No key with id {key_id!r}.", "key_not_found", "key_id")
        return record


def _admin_tenant(t: Tenant | TenantRecord) -> AdminTenant:
    return AdminTenant.from_config(t) if isinstance(t, Tenant) else AdminTenant.from_record(t)


# --- what a caller may send ------------------------------------------------------------


def body_object(body: Any, allowed: set[str]) -> dict[str, Any]:
    """The JSON body as an object with only `allowed` fields."""
    if not isinstance(body, dict):
        raise bad_request("invalid_body", "The request body must be a JSON object.")
    for name in body:
        if name not in allowed:
            raise bad_request("unknown_parameter", f"Unknown parameter {name!r}.", name)
    return body


def check_tenant_id(value: Any) -> str:
    if not isinstance(value, str) or not TENANT_ID_RE.match(value):
        raise bad_request("invalid_value", "`id` must be 1 to 64 characters of a-z, 0-9 and -.", "id")
    return value


def check_name(value: Any, param: str = "name") -> str:
    """A name operators read in tables and logs: no control characters (a terminal escape
    in a tenant's name would reach every `admin tenants list`), no bidi overrides or line
    separators (they reorder or break what a table shows), and at least one visible
    character (not only spaces or zero-width ones)."""
    if not isinstance(value, str) or len(value) > MAX_NAME or CONTROL_RE.search(value) or not VISIBLE_RE.search(value):
        raise bad_request(
            "invalid_value",
            f"`{param}` must be a string of at most {MAX_NAME} characters with a visible one, without control "
            "characters, line separators or bidi overrides.",
            param,
        )
    return value


def check_bool(value: Any, param: str) -> bool:
    if not isinstance(value, bool):
        raise bad_request("invalid_type", f"`{param}` must be true or false.", param)
    return value


def check_limits(value: Any) -> dict[str, int | None]:
    """`limits`: each a positive integer up to 2^63-1, or null for none."""
    if not isinstance(value, dict):
        raise bad_request("invalid_type", "`limits` must be an object.", "limits")
    out: dict[str, int | None] = {}
    for name, limit in value.items():
        param = f"limits.{name}"
        if name not in ALL_LIMITS:
            raise bad_request(
                "unknown_parameter", f"Unknown limit {name!r}; limits are {', '.join(ALL_LIMITS)}.", param
            )
        if limit is not None and (not is_type(limit, int) or not 1 <= limit <= MAX_LIMIT):
            raise bad_request(
                "invalid_value", f"`{param}` must be a positive integer up to {MAX_LIMIT}, or null for none.", param
            )
        out[name] = limit
    return out


def check_policy(value: Any, relays: Collection[str] = ()) -> dict[str, Any]:
    """`policy` as the config file's `[tenants.policy]` (the same checks), as stored;
    `relays`, the configured relay ids its `relays` may name."""
    try:
        policy = parse_policy(value)
    except ConfigError as err:
        where, _, problem = err.problems[0].partition(": ")
        raise bad_request("invalid_value", f"`{where}` {problem}.", where) from None
    for i, relay in enumerate(policy.relays):
        if relay not in relays:
            where = f"policy.relays[{i}]"
            known = ", ".join(sorted(relays))
            raise bad_request("invalid_value", f"`{where}` names unknown relay {relay!r} (configured: {known}).", where)
    stored: dict[str, Any] = {
        "force": policy.force,
        "defaults": policy.defaults,
        "hook_hosts": list(policy.hook_hosts),
    }
    if policy.relays:
        stored["relays"] = list(policy.relays)
    return stored


def check_seconds(value: Any, param: str, *, zero: bool) -> int:
    """A duration in whole seconds: positive (or zero when `zero`), at most a century."""
    low = 0 if zero else 1
    if not is_type(value, int) or not low <= value <= MAX_SECONDS:
        raise bad_request("invalid_value", f"`{param}` must be an integer from {low} to {MAX_SECONDS}.", param)
    return int(value)


def check_expires_at(value: Any, now: float) -> int | None:
    if value is None:
        return None
    if not is_type(value, int) or not now < value <= now + MAX_SECONDS:
        raise bad_request(
            "invalid_value",
            "`expires_at` must be a future Unix time in seconds (at most a century away), or null.",
            "expires_at",
        )
    return int(value)


def tenant_create(body: Any, now: float, relays: Collection[str] = ()) -> TenantRecord:
    """A new tenant from `POST /admin/v1/tenants` (its webhook secret is added by the route)."""
    b = body_object(body, {"id", "name", "enabled", "limits", "policy"})
    if "id" not in b:
        raise bad_request("missing_required_parameter", "`id` is required.", "id")
    tenant_id = check_tenant_id(b["id"])
    limits = {k: v for k, v in check_limits(b.get("limits", {})).items() if v is not None}
    return TenantRecord(
        id=tenant_id,
        name=check_name(b["name"]) if "name" in b else tenant_id,
        enabled=check_bool(b["enabled"], "enabled") if "enabled" in b else True,
        limits=Limits(**limits),
        policy=check_policy(b.get("policy", {}), relays),
        created_at=now,
        updated_at=now,
    )


def tenant_changes(body: Any, relays: Collection[str] = ()) -> dict[str, Any]:
    """`PATCH /admin/v1/tenants/{id}`: the store's `changes` (a null limit removes it)."""
    b = body_object(body, {"name", "enabled", "limits", "policy"})
    changes: dict[str, Any] = {}
    if "name" in b:
        changes["name"] = check_name(b["name"])
    if "enabled" in b:
        changes["enabled"] = check_bool(b["enabled"], "enabled")
    if "limits" in b:
        changes["limits"] = check_limits(b["limits"])
    if "policy" in b:
        changes["policy"] = check_policy(b["policy"], relays)
    return changes


def key_create(body: Any, now: float) -> tuple[str, int | None]:
    """`POST /admin/v1/tenants/{id}/keys`: the name and expiry of the key to mint (its
    limits, scopes and networks: `key_access`)."""
    b = body_object(body, {"name", "expires_at", "expires_in_seconds", *KEY_ACCESS})
    if "name" not in b:
        raise bad_request("missing_required_parameter", "`name` is required.", "name")
    if "expires_at" in b and "expires_in_seconds" in b:
        raise bad_request("invalid_value", "Give `expires_at` or `expires_in_seconds`, not both.", "expires_in_seconds")
    expires_at = check_expires_at(b.get("expires_at"), now)
    if b.get("expires_in_seconds") is not None:
        expires_at = math.ceil(now + check_seconds(b["expires_in_seconds"], "expires_in_seconds", zero=False))
    return check_name(b["name"]), expires_at


def key_changes(body: Any, now: float) -> dict[str, Any]:
    """`PATCH /admin/v1/keys/{key_id}`: a new name, a new expiry (null: never), and the
    changes of `key_access`."""
    b = body_object(body, {"name", "expires_at", *KEY_ACCESS})
    changes: dict[str, Any] = key_access(b)
    if "name" in b:
        changes["name"] = check_name(b["name"])
    if "expires_at" in b:
        changes["expires_at"] = check_expires_at(b["expires_at"], now)
    return changes


def key_access(b: dict[str, Any]) -> dict[str, Any]:
    """A key's own `limits` (each as a tenant's, null removes one), `scopes` and
    `allowed_cidrs` (null: all scopes, anywhere) from a checked body object, as the
    store's changes (contract §15); only those the body has."""
    out: dict[str, Any] = {}
    if "limits" in b:
        out["limits"] = check_limits(b["limits"])
    if "scopes" in b:
        out["scopes"] = check_scopes(b["scopes"])
    if "allowed_cidrs" in b:
        out["allowed_cidrs"] = check_cidrs(b["allowed_cidrs"])
    return out


def check_scopes(value: Any) -> tuple[str, ...] | None:
    """`scopes`: a non-empty list of create, read, delete (in that order, once each), or null for all."""
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise bad_request(
            "invalid_type", f"`scopes` must be a non-empty list of {', '.join(SCOPES)}, or null for all.", "scopes"
        )
    for i, scope in enumerate(value):
        if scope not in SCOPES:
            raise bad_request(
                "invalid_value", f"Unknown scope {scope!r}; scopes are {', '.join(SCOPES)}.", f"scopes.{i}"
            )
    return tuple(s for s in SCOPES if s in value)


def check_cidrs(value: Any) -> tuple[str, ...] | None:
    """`allowed_cidrs`: a non-empty list of IPv4/IPv6 networks (an address alone is its
    /32 or /128; host bits are cleared), or null for anywhere."""
    if value is None:
        return None
    if not isinstance(value, list) or not value or len(value) > MAX_CIDRS:
        raise bad_request(
            "invalid_type",
            f"`allowed_cidrs` must be a list of 1 to {MAX_CIDRS} CIDRs such as 10.20.0.0/16, or null for anywhere.",
            "allowed_cidrs",
        )
    networks: list[str] = []
    for i, cidr in enumerate(value):
        try:
            if not isinstance(cidr, str):
                raise ValueError
            network = str(ipaddress.ip_network(cidr.strip(), strict=False))
        except ValueError:
            raise bad_request(
                "invalid_value", f"`allowed_cidrs.{i}` is not a CIDR such as 10.20.0.0/16.", f"allowed_cidrs.{i}"
            ) from None
        if network not in networks:
            networks.append(network)
    return tuple(networks)


def grace_seconds(body: Any) -> int:
    """`{grace_seconds?}` of a rotation: default a day, 0 = the old secret stops at once."""
    b = body_object(body if body is not None else {}, {"grace_seconds"})
    if "grace_seconds" not in b:
        return DEFAULT_GRACE_SECONDS
    return check_seconds(b["grace_seconds"], "grace_seconds", zero=True)


# --- the audit trail -------------------------------------------------------------------


@dataclass
class AuditContext:
    """Who made the request, and from where: what every entry of it records."""

    actor: Actor
    request_id: str | None
    ip: str | None

    def entry(
        self,
        action: str,
        now: float,
        tenant: str | None,
        key_id: str | None = None,
        changes: dict[str, Any] | None = None,
    ) -> AuditEntry:
        return AuditEntry(
            id=new_audit_id(now),
            time=now,
            actor_type=self.actor.type,
            actor_id=self.actor.id,
            action=action,
            tenant=tenant,
            key_id=key_id,
            changes=changes or {},
            request_id=self.request_id,
            ip=self.ip,
        )
