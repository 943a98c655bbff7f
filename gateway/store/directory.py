"""How the directory's records are stored, the same way in both stores.

A tenant or key is a flat map of field name -> string (a Redis hash; the JSON of that map
in SQLite's `data` column), so an update is "set these fields, delete those" in either
store, with no decoding in Lua: text as is, booleans "1"/"0", times `repr(float)` (exact
round trip), `policy` as JSON, each set limit as `limit.<name>`; None is an absent field.
Changes (update_tenant, update_key) become such a (set, delete) pair here, once for both
stores. Audit entries are one JSON document each, never read by the stores.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import orjson

from gateway.store.base import ALL_LIMITS, AuditEntry, KeyRecord, Limits, TenantRecord

Fields = dict[str, str]
LIMIT = "limit."

# The encoding of each stored field (besides `id` and the limits).
TENANT_KINDS = {
    "name": "text",
    "enabled": "bool",
    "policy": "json",
    "webhook_secret": "text",
    "previous_webhook_secret": "text",
    "previous_webhook_secret_expires_at": "time",
    "earlier_webhook_secrets": "graces",
    "created_at": "time",
    "updated_at": "time",
}
KEY_KINDS = {
    "tenant_id": "text",
    "name": "text",
    "prefix": "text",
    "secret_hash": "text",
    "previous_hash": "text",
    "previous_expires_at": "time",
    "earlier_hashes": "graces",
    "created_at": "time",
    "expires_at": "time",
    "last_used_at": "time",
    "revoked_at": "time",
}
TENANT_CHANGES = frozenset(
    {"name", "enabled", "policy", "webhook_secret", "previous_webhook_secret", "previous_webhook_secret_expires_at"}
)
KEY_CHANGES = frozenset(
    {"name", "expires_at", "secret_hash", "prefix", "previous_hash", "previous_expires_at", "revoked_at"}
)
# a key's own scopes and networks (contract §15): JSON lists, absent = all / anywhere
KEY_LISTS = ("scopes", "allowed_cidrs")


def _encode(kind: str, value: Any) -> str:
    if kind == "graces":  # secret -> end of its grace, each end a time string (Lua keeps it exact)
        return orjson.dumps({k: repr(float(v)) for k, v in value.items()}).decode()
    if kind == "bool":
        return "1" if value else "0"
    if kind == "time":
        return repr(float(value))
    if kind == "json":
        return orjson.dumps(value).decode()
    return str(value)


def _decode(kind: str, value: str) -> Any:
    if kind == "graces":
        return {k: float(v) for k, v in orjson.loads(value).items()}
    if kind == "bool":
        return value == "1"
    if kind == "time":
        return float(value)
    if kind == "json":
        return orjson.loads(value)
    return value


def _fields(record: Any, kinds: Mapping[str, str]) -> Fields:
    out = {"id": record.id}
    for name, kind in kinds.items():
        value = getattr(record, name)
        if value is not None and value != {}:
            out[name] = _encode(kind, value)
    return out


def _values(h: Mapping[str, str], kinds: Mapping[str, str]) -> dict[str, Any]:
    return {name: _decode(kind, h[name]) for name, kind in kinds.items() if name in h}


def _limit_fields(limits: Limits) -> Fields:
    return {LIMIT + name: str(int(value)) for name in ALL_LIMITS if (value := getattr(limits, name)) is not None}


def _limits(h: Mapping[str, str]) -> Limits:
    return Limits(**{name: int(h[LIMIT + name]) for name in ALL_LIMITS if LIMIT + name in h})


def tenant_fields(t: TenantRecord) -> Fields:
    return {**_fields(t, TENANT_KINDS), **_limit_fields(t.limits)}


def tenant_from_fields(h: Mapping[str, str]) -> TenantRecord:
    return TenantRecord(id=h["id"], limits=_limits(h), **_values(h, TENANT_KINDS))


def key_fields(k: KeyRecord) -> Fields:
    out = {**_fields(k, KEY_KINDS), **_limit_fields(k.limits)}
    for name in KEY_LISTS:
        value = getattr(k, name)
        if value is not None:
            out[name] = _encode("json", list(value))
    return out


def key_from_fields(h: Mapping[str, str]) -> KeyRecord:
    lists: dict[str, Any] = {name: tuple(_decode("json", h[name])) for name in KEY_LISTS if name in h}
    return KeyRecord(id=h["id"], limits=_limits(h), **lists, **_values(h, KEY_KINDS))


def _limit_changes(limits: Mapping[str, int | None], put: Fields, drop: list[str]) -> None:
    """A `limits` change merged limit by limit (None removes one), into (put, drop)."""
    for name, value in limits.items():
        if name not in ALL_LIMITS:
            raise ValueError(f"unknown limit {name!r}")
        if value is None:
            drop.append(LIMIT + name)
        else:
            put[LIMIT + name] = str(int(value))


def _changes(changes: Mapping[str, Any], allowed: frozenset[str], kinds: Mapping[str, str]) -> tuple[Fields, list[str]]:
    """(fields to set, fields to delete) for `changes`; None deletes an optional field."""
    put: Fields = {}
    drop: list[str] = []
    for name, value in changes.items():
        if name not in allowed:
            raise ValueError(f"unknown change {name!r}")
        if value is None:
            drop.append(name)
        else:
            put[name] = _encode(kinds[name], value)
    return put, drop


def tenant_changes(changes: Mapping[str, Any], now: float) -> tuple[Fields, list[str]]:
    """update_tenant's `changes` as (set, delete): `limits` merged limit by limit (None
    removes one), `policy` replaced, `updated_at` = now."""
    rest = {k: v for k, v in changes.items() if k != "limits"}
    put, drop = _changes(rest, TENANT_CHANGES, TENANT_KINDS)
    _limit_changes(changes.get("limits") or {}, put, drop)
    put["updated_at"] = _encode("time", now)
    return put, drop


def key_changes(changes: Mapping[str, Any]) -> tuple[Fields, list[str]]:
    """update_key's `changes` as (set, delete): `limits` merged limit by limit as a
    tenant's, `scopes` and `allowed_cidrs` replaced (None removes them: all, anywhere)."""
    rest = {k: v for k, v in changes.items() if k not in ("limits", *KEY_LISTS)}
    put, drop = _changes(rest, KEY_CHANGES, KEY_KINDS)
    _limit_changes(changes.get("limits") or {}, put, drop)
    for name in KEY_LISTS:
        if name in changes:
            value = changes[name]
            if value is None:
                drop.append(name)
            else:
                put[name] = _encode("json", list(value))
    return put, drop


# A rotation's slots: the field holding the secret (or its hash), the previous one's, when
# the previous one stops working, and the earlier ones still in their grace (with their ends).
KEY_SECRET = ("secret_hash", "previous_hash", "previous_expires_at", "earlier_hashes")
TENANT_SECRET = (
    "webhook_secret",
    "previous_webhook_secret",
    "previous_webhook_secret_expires_at",
    "earlier_webhook_secrets",
)


def grace_field(grace_until: float | None, now: float) -> str:
    """The stored end of a rotation's grace period; '' when there is none (None or not
    after `now`): the old secret is dropped at once. Decided here, before the atomic step,
    so that the Redis scripts only copy fields."""
    return _encode("time", grace_until) if grace_until is not None and grace_until > now else ""


def rotated(
    h: Mapping[str, str], slots: tuple[str, str, str, str], put: Fields, grace: str, now: float
) -> tuple[Fields, list[str]]:
    """(set, delete) for a rotation of the stored record `h` at `now` (mirrored by
    rotate_secret in lib.lua): `put` holds the new secret; the one stored now moves to the
    previous slot until `grace` (grace_field), or the previous slot is emptied when `grace`
    is ''. A previous secret still in its own grace joins the earlier ones, which keep
    theirs: each rotation's grace holds for the secret it replaced. Expired ones go."""
    current, previous, expires, earlier = slots
    kept = {k: v for k, v in orjson.loads(h.get(earlier, "{}")).items() if float(v) > now}
    if h.get(previous) and expires in h and float(h[expires]) > now:
        kept[h[previous]] = h[expires]
    out: Fields = dict(put)
    drop: list[str] = []
    if grace:
        out.update({previous: h.get(current, ""), expires: grace})
    else:
        drop += [previous, expires]
    if kept:
        out[earlier] = orjson.dumps(kept).decode()
    else:
        drop.append(earlier)
    return out, drop


def merged(h: Mapping[str, str], put: Fields, drop: list[str]) -> Fields:
    """What the Redis scripts do with HSET/HDEL, for SQLite's JSON column."""
    out = {k: v for k, v in h.items() if k not in drop}
    out.update(put)
    return out


def later_use(h: Mapping[str, str], used_at: float) -> str | None:
    """The `last_used_at` field to store for a use at `used_at` (None: not later)."""
    current = h.get("last_used_at")
    if current is not None and float(current) >= used_at:
        return None
    return _encode("time", used_at)


def audit_json(entry: AuditEntry) -> bytes:
    return orjson.dumps(asdict(entry))


def audit_from_json(data: bytes | str) -> AuditEntry:
    return AuditEntry(**orjson.loads(data))
