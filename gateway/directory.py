"""Who may call, in memory: every tenant and key of the config file and of the store.

A `Directory` is an immutable snapshot, so a request reads one consistent view without a
lock and without a store round trip. `DirectoryCache` holds the current one: a background
worker reads the store's directory version every `REFRESH_SECONDS` and reloads the store's
tenants and keys only when it moved, then swaps the snapshot in one assignment. A config
reload swaps it the same way, keeping the store's part.

Revocation takes effect at the next refresh. Expiry and a rotation's grace period are
times kept on each key and compared with the clock on every request, so no snapshot,
however stale, can extend them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.config import Config, Policy, Tenant
from gateway.jwts import JWTVerifier
from gateway.ssrf import HookPolicy
from gateway.store.base import CONFIG_KEY_PREFIX, DirectorySnapshot, KeyLimits, KeyRecord, Store, TenantRecord

logger = logging.getLogger("gateway.directory")
REFRESH_SECONDS = 0.25
NO_VERSION = -1  # the store's part was never read


def config_key_id(configured_hash: str) -> str:
    """A config key's id: stable across restarts and replicas, and no secret (a prefix of
    the hash of its `sha256:<hex>` string, never of the key)."""
    return CONFIG_KEY_PREFIX + hashlib.sha256(configured_hash.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class KeyEntry:
    """One accepted secret hash: whose it is and until when. A rotated key has an entry per
    secret (its current one and, each until its own `until`, the ones its rotations
    replaced) with the same id; revoking the key ends them all."""

    key_id: str
    tenant_id: str
    expires_at: float | None = None
    revoked_at: float | None = None
    until: float | None = None  # the end of a rotation's grace period (previous secret only)
    # contract §15, API keys only: its own limits (None: none, so admission does no extra
    # work), scopes (None: all) and networks (None: anywhere)
    limits: KeyLimits | None = None
    scopes: frozenset[str] | None = None
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None = None

    def valid(self, now: float) -> bool:
        if self.revoked_at is not None:  # never compared with a clock: skew cannot undo it
            return False
        if self.expires_at is not None and self.expires_at <= now:
            return False
        return self.until is None or now < self.until


@dataclass(frozen=True)
class Directory:
    """Tenants by id and keys by hash at one moment, plus the config they were merged with."""

    config: Config
    version: int = NO_VERSION
    tenants: Mapping[str, Tenant] = field(default_factory=dict)
    sources: Mapping[str, str] = field(default_factory=dict)  # tenant id -> "config" | "api"
    keys: Mapping[str, KeyEntry] = field(default_factory=dict)  # "sha256:<hex>" -> entry
    hook_policies: Mapping[str, HookPolicy] = field(default_factory=dict)
    # tenant id -> (secret, end of its grace) of each secret replaced by a rotation
    previous_webhook_secrets: Mapping[str, tuple[tuple[str, float], ...]] = field(default_factory=dict)
    store_part: DirectorySnapshot | None = None  # kept so a config reload can merge again
    jwt: JWTVerifier | None = None  # built from config.jwt (it may read a key file)

    @classmethod
    def build(cls, config: Config, snapshot: DirectorySnapshot | None, jwt: JWTVerifier | None = None) -> Directory:
        """Config tenants first ("source": "config", they win an id clash), then the store's."""
        tenants: dict[str, Tenant] = {}
        sources: dict[str, str] = {}
        previous: dict[str, tuple[tuple[str, float], ...]] = {}
        for tenant_id, t in merge_tenants(config, snapshot.tenants if snapshot else ()).items():
            if isinstance(t, Tenant):
                tenants[tenant_id], sources[tenant_id] = t, "config"
                continue
            tenants[tenant_id], sources[tenant_id] = runtime_tenant(t), "api"
            graces = dict(t.earlier_webhook_secrets)
            if t.previous_webhook_secret and t.previous_webhook_secret_expires_at:
                graces[t.previous_webhook_secret] = t.previous_webhook_secret_expires_at
            if graces:
                previous[tenant_id] = tuple(graces.items())
        keys = {h: KeyEntry(config_key_id(h), t.id) for t in config.tenants for h in t.keys}
        for key in snapshot.keys if snapshot else []:
            if key.tenant_id in tenants:
                keys.update(with_access(key, key_entries(key)))
        return cls(
            config=config,
            version=snapshot.version if snapshot else NO_VERSION,
            tenants=tenants,
            sources=sources,
            keys=keys,
            hook_policies={tid: HookPolicy.from_hosts(t.policy.hook_hosts) for tid, t in tenants.items()},
            previous_webhook_secrets=previous,
            store_part=snapshot,
            jwt=jwt,
        )

    def key(self, hashed: str, now: float) -> KeyEntry | None:
        """The entry of a secret's hash if it authenticates now (not revoked, expired or
        past its grace period)."""
        entry = self.keys.get(hashed)
        return entry if entry is not None and entry.valid(now) else None

    def webhook_secrets(self, tenant_id: str, now: float) -> tuple[str, ...]:
        """The secrets a delivery is signed with: the current one, and each one a rotation
        replaced while its grace period lasts (latest ending first)."""
        tenant = self.tenants.get(tenant_id)
        if tenant is None or not tenant.webhook_secret:
            return ()
        previous = sorted(self.previous_webhook_secrets.get(tenant_id, ()), key=lambda p: -p[1])
        return (tenant.webhook_secret, *(secret for secret, until in previous if now < until))

    def tenant_limits(self) -> dict[str, dict[str, int | None]]:
        return {tid: vars(t.limits) for tid, t in self.tenants.items()}


def merge_tenants(config: Config, records: Iterable[TenantRecord]) -> dict[str, Tenant | TenantRecord]:
    """The one rule for merging the two sources of tenants, for requests (Directory.build)
    and the admin API alike: config tenants first, and a stored tenant with a config
    tenant's id stays hidden (the file wins, so an operator's edit is never shadowed)."""
    merged: dict[str, Tenant | TenantRecord] = {t.id: t for t in config.tenants}
    for record in records:
        merged.setdefault(record.id, record)
    return merged


def runtime_tenant(record: TenantRecord) -> Tenant:
    """A store tenant in the shape requests use (the config's)."""
    policy: dict[str, Any] = record.policy or {}
    return Tenant(
        id=record.id,
        webhook_secret=record.webhook_secret,
        enabled=record.enabled,
        limits=record.limits,
        policy=Policy(
            force=dict(policy.get("force") or {}),
            defaults=dict(policy.get("defaults") or {}),
            hook_hosts=tuple(h.lower() for h in policy.get("hook_hosts") or ()),
            relays=tuple(policy.get("relays") or ()),
        ),
    )


def key_entries(key: KeyRecord) -> dict[str, KeyEntry]:
    current = KeyEntry(key.id, key.tenant_id, key.expires_at, key.revoked_at)
    graces = dict(key.earlier_hashes)
    if key.previous_hash and key.previous_expires_at is not None:
        graces[key.previous_hash] = key.previous_expires_at
    entries = {h: KeyEntry(key.id, key.tenant_id, key.expires_at, key.revoked_at, until=t) for h, t in graces.items()}
    entries[key.secret_hash] = current  # the current secret wins, should it ever come back
    return entries


def with_access(key: KeyRecord, entries: dict[str, KeyEntry]) -> dict[str, KeyEntry]:
    """A stored key's entries (each of its secrets) with its own limits, scopes and
    networks (contract §15): a rotation keeps them. A key without any is left as it is."""
    limits = KeyLimits(key.id, key.limits) if key.limits.has_any() else None
    scopes = frozenset(key.scopes) if key.scopes is not None else None
    cidrs = key.allowed_cidrs
    networks = tuple(ipaddress.ip_network(c, strict=False) for c in cidrs) if cidrs is not None else None
    if limits is None and scopes is None and networks is None:
        return entries
    return {
        h: KeyEntry(e.key_id, e.tenant_id, e.expires_at, e.revoked_at, e.until, limits, scopes, networks)
        for h, e in entries.items()
    }


class DirectoryCache:
    """Holds the current `Directory`; `run_forever` keeps it within `REFRESH_SECONDS` of the
    store. A store outage keeps the last snapshot (logged once) and retries each round."""

    def __init__(
        self,
        config: Config,
        jwt: JWTVerifier | None,
        store: Store,
        on_change: Callable[[Directory], None] | None = None,
        interval: float = REFRESH_SECONDS,
    ):
        self.current = Directory.build(config, None, jwt)
        self._store = store
        self._on_change = on_change
        self._interval = interval
        self._failing = False

    async def refresh(self) -> bool:
        """Reload the store's part if its version moved; True when the snapshot changed.
        Two refreshes may overlap (the background round and an admin change applied at
        once): a snapshot older than the one held is never swapped in."""
        version = await self._store.directory_version()
        if version == self.current.version:
            return False
        snapshot = await self._store.load_directory()
        if snapshot.version <= self.current.version:
            return False
        self._swap(Directory.build(self.current.config, snapshot, self.current.jwt))
        return True

    async def apply_own_change(self) -> None:
        """After this process changed a tenant or key: take the change now, not at the next
        round, so the replica that minted a key never refuses it. The change is stored
        already: a failed read only leaves it to the background round."""
        try:
            await self.refresh()
        except Exception as exc:
            logger.warning("directory refresh after an admin change failed (the next round retries): %s", exc)

    def reconfigure(self, config: Config, jwt: JWTVerifier | None) -> None:
        """A reloaded config file: merge it with the store's part already held."""
        self._swap(Directory.build(config, self.current.store_part, jwt))

    def _swap(self, directory: Directory) -> None:
        self.current = directory
        if self._on_change is not None:
            self._on_change(directory)

    async def run_forever(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self._refresh_logged()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._interval)

    async def _refresh_logged(self) -> None:
        try:
            await self.refresh()
        except Exception as exc:  # store down: serve the last snapshot, keep trying
            if not self._failing:
                logger.warning("directory refresh failed, serving the last snapshot: %s", exc)
            self._failing = True
            return
        if self._failing:
            logger.warning("directory refresh works again")
        self._failing = False


class LastUsed:
    """`last_used_at` of API keys, noted in memory on each request and written to the store
    in one batch every `interval` seconds (and at shutdown): never a write per request, at
    most `interval` plus one failed round stale. Config keys (no store record) are noted
    too: the store keeps their times apart, by their stable ids."""

    def __init__(self, store: Store, interval: float = 30.0):
        self._store = store
        self.interval = interval
        self._pending: dict[str, float] = {}

    def note(self, key_id: str, now: float) -> None:
        self._pending[key_id] = now

    async def flush(self) -> None:
        """Write the batch; on failure put it back (a newer use wins) for the next round."""
        batch, self._pending = self._pending, {}
        if not batch:
            return
        try:
            await self._store.touch_keys(batch)
        except Exception:
            for key_id, t in batch.items():
                self._pending[key_id] = max(t, self._pending.get(key_id, t))
            raise
