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
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.config import Config, Policy, Tenant
from gateway.ssrf import HookPolicy
from gateway.store.base import DirectorySnapshot, KeyRecord, Store, TenantRecord

if TYPE_CHECKING:
    from gateway.auth import JWTVerifier

logger = logging.getLogger("gateway.directory")
REFRESH_SECONDS = 0.25
NO_VERSION = -1  # the store's part was never read


def config_key_id(configured_hash: str) -> str:
    """A config key's id: stable across restarts and replicas, and no secret (a prefix of
    the hash of its `sha256:<hex>` string, never of the key)."""
    return "key_cfg_" + hashlib.sha256(configured_hash.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class KeyEntry:
    """One accepted secret hash: whose it is and until when. A rotated key has two entries
    (its current secret and, until `until`, its previous one) with the same id."""

    key_id: str
    tenant_id: str
    expires_at: float | None = None
    revoked_at: float | None = None
    until: float | None = None  # the end of a rotation's grace period (previous secret only)

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
    previous_webhook_secrets: Mapping[str, tuple[str, float]] = field(default_factory=dict)
    store_part: DirectorySnapshot | None = None  # kept so a config reload can merge again
    jwt: JWTVerifier | None = None  # built from config.jwt (it may read a key file)

    @classmethod
    def build(cls, config: Config, snapshot: DirectorySnapshot | None, jwt: JWTVerifier | None = None) -> Directory:
        """Config tenants first ("source": "config", they win an id clash), then the store's."""
        tenants: dict[str, Tenant] = {}
        sources: dict[str, str] = {}
        previous: dict[str, tuple[str, float]] = {}
        for tenant_id, t in merge_tenants(config, snapshot.tenants if snapshot else ()).items():
            if isinstance(t, Tenant):
                tenants[tenant_id], sources[tenant_id] = t, "config"
                continue
            tenants[tenant_id], sources[tenant_id] = runtime_tenant(t), "api"
            if t.previous_webhook_secret and t.previous_webhook_secret_expires_at:
                previous[tenant_id] = (t.previous_webhook_secret, t.previous_webhook_secret_expires_at)
        keys = {h: KeyEntry(config_key_id(h), t.id) for t in config.tenants for h in t.keys}
        for key in snapshot.keys if snapshot else []:
            if key.tenant_id in tenants:
                keys.update(key_entries(key))
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
        """The secrets a delivery is signed with: the current one, and during a rotation's
        grace period the previous one too."""
        tenant = self.tenants.get(tenant_id)
        if tenant is None or not tenant.webhook_secret:
            return ()
        previous = self.previous_webhook_secrets.get(tenant_id)
        if previous is not None and now < previous[1]:
            return (tenant.webhook_secret, previous[0])
        return (tenant.webhook_secret,)

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
    entries = {key.secret_hash: current}
    if key.previous_hash and key.previous_expires_at is not None:
        entries[key.previous_hash] = KeyEntry(
            key.id, key.tenant_id, key.expires_at, key.revoked_at, until=key.previous_expires_at
        )
    return entries


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
        """Reload the store's part if its version moved; True when the snapshot changed."""
        version = await self._store.directory_version()
        if version == self.current.version:
            return False
        snapshot = await self._store.load_directory()
        self._swap(Directory.build(self.current.config, snapshot, self.current.jwt))
        return True

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
    most `interval` plus one failed round stale. Config keys have no store record."""

    def __init__(self, store: Store, interval: float = 30.0):
        self._store = store
        self.interval = interval
        self._pending: dict[str, float] = {}

    def note(self, key_id: str, now: float) -> None:
        if not key_id.startswith("key_cfg_"):
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
