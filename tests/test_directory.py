"""The in-process directory of tenants and keys: merging config and store, key validity at
request time, refresh on the store's version, store outages, last_used_at batching; then
real processes: a change made in the store reaches every replica and worker within 1 s."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from conftest import ADMIN_KEY, GatewayProcess, Simulator, TenantSpec, key_hash, probe, wait_until

from gateway.auth import Authenticator
from gateway.config import Config, Tenant
from gateway.directory import Directory, DirectoryCache, KeyEntry, LastUsed, config_key_id
from gateway.errors import AuthFailure, GatewayError
from gateway.store import open_store
from gateway.store.base import AuditEntry, DirectorySnapshot, KeyRecord, Limits, Store, TenantRecord
from gateway.webhooks import sign, verify

T = TypeVar("T")
CONFIG_HASH = key_hash("sk-config-key")
NEW_SECRET, OLD_SECRET = "sk-gw-new-secret", "sk-gw-old-secret"


def api_key(key_id: str, tenant: str, secret: str, **kw: Any) -> KeyRecord:
    return KeyRecord(id=key_id, tenant_id=tenant, name="svc", prefix=secret[:10], secret_hash=key_hash(secret), **kw)


def snapshot(version: int, tenants: list[TenantRecord], keys: list[KeyRecord]) -> DirectorySnapshot:
    return DirectorySnapshot(version, tenants, keys)


CONFIG = Config(tenants=(Tenant("cfg-team", keys=(CONFIG_HASH,)),))


# --- the snapshot ------------------------------------------------------------------------


def test_directory_merges_config_and_store_tenants_and_keys() -> None:
    store_part = snapshot(
        3,
        [TenantRecord("api-team", limits=Limits(requests_per_minute=5)), TenantRecord("cfg-team", enabled=False)],
        [
            api_key("key_a", "api-team", NEW_SECRET),
            api_key("key_b", "cfg-team", OLD_SECRET),
            api_key("key_c", "gone", "x"),
        ],
    )
    d = Directory.build(CONFIG, store_part)
    assert d.version == 3
    assert d.sources == {"cfg-team": "config", "api-team": "api"}
    assert d.tenants["cfg-team"].enabled  # a config tenant wins an id clash
    assert d.tenants["api-team"].limits.requests_per_minute == 5
    assert d.key(CONFIG_HASH, 0) == KeyEntry(config_key_id(CONFIG_HASH), "cfg-team")
    assert config_key_id(CONFIG_HASH).startswith("key_cfg_") and len(config_key_id(CONFIG_HASH)) == 20
    assert d.key(key_hash(OLD_SECRET), 0) is not None  # an API key of a config tenant
    assert key_hash("x") not in d.keys  # a key of an unknown tenant authenticates nothing


def test_key_validity_is_checked_against_the_clock_on_every_lookup() -> None:
    keys = [
        api_key("key_exp", "api-team", "sk-expiring", expires_at=100.0),
        api_key("key_rev", "api-team", "sk-revoked", revoked_at=10_000.0),  # even "in the future"
        api_key("key_rot", "api-team", NEW_SECRET, previous_hash=key_hash(OLD_SECRET), previous_expires_at=50.0),
    ]
    d = Directory.build(Config(), snapshot(1, [TenantRecord("api-team")], keys))
    assert d.key(key_hash("sk-expiring"), 99.9) is not None
    assert d.key(key_hash("sk-expiring"), 100.0) is None
    assert d.key(key_hash("sk-revoked"), 0) is None
    old, new = key_hash(OLD_SECRET), key_hash(NEW_SECRET)
    assert d.key(old, 49.9) is not None and d.key(old, 50.0) is None
    assert d.key(new, 10_000) is not None and d.keys[new].key_id == d.keys[old].key_id == "key_rot"


def test_a_key_revoked_during_its_rotation_grace_refuses_both_secrets() -> None:
    """Revocation ends the grace period too: neither the new secret nor the previous one
    authenticates, long before the grace would have ended."""
    rotated = api_key("key_rg", "api-team", NEW_SECRET, previous_hash=key_hash(OLD_SECRET), previous_expires_at=9e9)
    live = Directory.build(Config(), snapshot(1, [TenantRecord("api-team")], [rotated]))
    assert live.key(key_hash(NEW_SECRET), 100) is not None and live.key(key_hash(OLD_SECRET), 100) is not None
    revoked = dataclasses.replace(rotated, revoked_at=100.0)
    d = Directory.build(Config(), snapshot(2, [TenantRecord("api-team")], [revoked]))
    assert d.key(key_hash(NEW_SECRET), 100.5) is None
    assert d.key(key_hash(OLD_SECRET), 100.5) is None
    assert d.key(key_hash(OLD_SECRET), 50.0) is None  # even on a clock behind the revocation


def test_authenticator_names_the_key_and_refuses_a_disabled_tenant() -> None:
    keys = [api_key("key_on", "on", "sk-on"), api_key("key_off", "off", "sk-off")]
    d = Directory.build(CONFIG, snapshot(1, [TenantRecord("on"), TenantRecord("off", enabled=False)], keys))
    auth = Authenticator(lambda: d, lambda: 0.0)
    principal = auth.authenticate("Bearer sk-on")
    assert (principal.tenant.id, principal.key_id, principal.method) == ("on", "key_on", "key")
    assert auth.authenticate("Bearer sk-config-key").key_id == config_key_id(CONFIG_HASH)
    with pytest.raises(GatewayError) as refused:
        auth.authenticate("Bearer sk-off")
    assert refused.value.status == 403
    with pytest.raises(AuthFailure):
        auth.authenticate("Bearer sk-unknown")


def test_webhook_signature_carries_one_v1_per_secret_during_a_rotation() -> None:
    header = sign("new-secret", b"{}", 1000, "old-secret")
    assert header.count("v1=") == 2
    assert verify("new-secret", b"{}", header, now=1000) and verify("old-secret", b"{}", header, now=1000)
    d = Directory.build(
        Config(),
        snapshot(
            1,
            [
                TenantRecord(
                    "t", webhook_secret="new", previous_webhook_secret="old", previous_webhook_secret_expires_at=60.0
                )
            ],
            [],
        ),
    )
    assert d.webhook_secrets("t", 59) == ("new", "old")
    assert d.webhook_secrets("t", 60) == ("new",)


def test_every_secret_a_rotation_replaced_works_until_its_own_grace_ends() -> None:
    """Overlapping rotations: A -> B (A until 100), B -> C (B until 20), C -> D at once:
    A, B and D authenticate, each old one until its own end; revocation ends them all."""
    a, b, c, d_ = "sk-a", "sk-b", "sk-c", "sk-d"
    rotated = api_key("key_r", "api-team", d_, earlier_hashes={key_hash(a): 100.0, key_hash(b): 20.0})
    d = Directory.build(Config(), snapshot(1, [TenantRecord("api-team")], [rotated]))
    auth = Authenticator(lambda: d, lambda: 19.0)
    assert {auth.authenticate(f"Bearer {s}").key_id for s in (a, b, d_)} == {"key_r"}
    with pytest.raises(AuthFailure):
        auth.authenticate(f"Bearer {c}")
    assert d.key(key_hash(b), 20.0) is None and d.key(key_hash(a), 99.0) is not None
    assert d.key(key_hash(a), 100.0) is None
    revoked = Directory.build(Config(), snapshot(2, [TenantRecord("api-team")], [replace(rotated, revoked_at=5.0)]))
    assert [revoked.key(key_hash(s), 0) for s in (a, b, d_)] == [None, None, None]
    tenant = TenantRecord(
        "t",
        webhook_secret="new",
        previous_webhook_secret="mid",
        previous_webhook_secret_expires_at=30.0,
        earlier_webhook_secrets={"old": 60.0},
    )
    hooks = Directory.build(Config(), snapshot(1, [tenant], []))
    assert hooks.webhook_secrets("t", 29) == ("new", "old", "mid")
    assert hooks.webhook_secrets("t", 30) == ("new", "old") and hooks.webhook_secrets("t", 60) == ("new",)


# --- the holder -------------------------------------------------------------------------


class FakeStore:
    """The directory part of a store, with an outage switch."""

    def __init__(self) -> None:
        self.part = snapshot(1, [TenantRecord("api-team")], [api_key("key_a", "api-team", NEW_SECRET)])
        self.loads = 0
        self.down = False
        self.touched: list[dict[str, float]] = []

    async def directory_version(self) -> int:
        if self.down:
            raise ConnectionError("store down")
        return self.part.version

    async def load_directory(self) -> DirectorySnapshot:
        self.loads += 1
        return self.part

    async def touch_keys(self, last_used: dict[str, float]) -> None:
        if self.down:
            raise ConnectionError("store down")
        self.touched.append(dict(last_used))


def as_store(fake: FakeStore) -> Store:
    store: Store = fake  # type: ignore[assignment]
    return store


async def test_cache_reloads_only_when_the_version_moved_and_survives_an_outage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeStore()
    seen: list[int] = []
    cache = DirectoryCache(CONFIG, None, as_store(fake), on_change=lambda d: seen.append(d.version), interval=0.01)
    assert await cache.refresh() and not await cache.refresh()
    assert fake.loads == 1 and seen == [1]
    fake.down = True
    stop = asyncio.Event()
    runner = asyncio.create_task(cache.run_forever(stop))
    await asyncio.sleep(0.1)  # several failed rounds
    assert cache.current.key(key_hash(NEW_SECRET), 0) is not None  # the last snapshot serves
    assert caplog.text.count("directory refresh failed") == 1  # logged once, not per round
    fake.part = snapshot(2, [TenantRecord("api-team")], [])  # a revocation made during the outage
    fake.down = False
    await asyncio.wait_for(_until(lambda: cache.current.version == 2), 2)
    assert cache.current.key(key_hash(NEW_SECRET), 0) is None
    cache.reconfigure(Config(), None)  # a reload keeps the store's part, drops the config's
    assert "cfg-team" not in cache.current.tenants and "api-team" in cache.current.tenants
    stop.set()
    await runner


async def test_overlapping_refreshes_never_swap_in_an_older_snapshot() -> None:
    """The background round and an admin change's refresh can overlap: the one that read
    the older snapshot finishing last must not undo the newer one."""
    fake = FakeStore()
    cache = DirectoryCache(CONFIG, None, as_store(fake))
    fake.part = snapshot(3, [TenantRecord("api-team")], [api_key("key_b", "api-team", "sk-new-key")])
    await cache.apply_own_change()
    assert cache.current.version == 3 and cache.current.key(key_hash("sk-new-key"), 0) is not None
    slow_version = 2  # read the version before the change, the snapshot after it was older still
    fake.part = snapshot(slow_version, [TenantRecord("api-team")], [])
    assert not await cache.refresh()
    assert cache.current.version == 3 and cache.current.key(key_hash("sk-new-key"), 0) is not None
    fake.down = True
    await cache.apply_own_change()  # a failed read leaves it to the next round, never raises


async def _until(check: Callable[[], bool]) -> None:
    while not check():
        await asyncio.sleep(0.01)


async def test_last_used_is_batched_and_kept_across_a_failed_flush() -> None:
    fake = FakeStore()
    used = LastUsed(as_store(fake), interval=30)
    used.note("key_a", 10.0)
    used.note("key_a", 11.0)
    used.note(config_key_id(CONFIG_HASH), 11.0)  # a config key too: the store keeps it apart
    fake.down = True
    with pytest.raises(ConnectionError):
        await used.flush()
    used.note("key_b", 12.0)
    fake.down = False
    await used.flush()
    await used.flush()  # nothing pending: no write
    assert fake.touched == [{"key_a": 11.0, config_key_id(CONFIG_HASH): 11.0, "key_b": 12.0}]


# --- real processes ------------------------------------------------------------------------


def in_store(url: str, operation: Callable[[Store], Awaitable[T]]) -> T:
    """One store operation from the test, as the admin API of any replica would make it."""

    async def run() -> T:
        store = open_store(url)
        await store.open()
        try:
            return await operation(store)
        finally:
            await store.close()

    return asyncio.run(run())


def audit(action: str, tenant: str) -> AuditEntry:
    return AuditEntry(
        id=f"aud_{int(time.time() * 1000):012x}{secrets.token_hex(4)}",
        time=time.time(),
        actor_type="admin_key",
        actor_id="adm_test",
        action=action,
        tenant=tenant,
    )


def status(gw: GatewayProcess, secret: str) -> int:
    return probe(gw.url, "/v1/models", secret).status


def within_a_second(gateways: list[GatewayProcess], expected: dict[str, int], since: float) -> float:
    """Seconds from `since` until every gateway answers each secret with its expected
    status (four times running, each on a new connection, so every worker of a gateway
    answers); asserted under 1 s. Every (gateway, secret) is polled in the same rounds,
    and each is timed at the end of its first all-expected round, so one check's polling
    never counts against another's bound."""
    pending = {(gw.url, secret): want for gw in gateways for secret, want in expected.items()}
    seen: dict[tuple[str, str], float] = {}
    deadline = since + 3
    while pending:
        for (url, secret), want in list(pending.items()):
            if all(probe(url, "/v1/models", secret).status == want for _ in range(4)):
                seen[(url, secret)] = time.monotonic()
                del pending[(url, secret)]
        if pending and time.monotonic() > deadline:
            raise AssertionError(f"timed out after 3s waiting for {pending}")
        time.sleep(0.01)
    elapsed = max(seen.values()) - since
    assert elapsed < 1.0, f"took {elapsed:.2f}s to answer {expected}"
    return elapsed


@pytest.fixture(params=["redis", "sqlite"])
def two_replicas(
    request: pytest.FixtureRequest, tmp_path: Path, sim: Simulator
) -> Iterator[tuple[str, list[GatewayProcess]]]:
    """Two gateway processes on one store: a private Redis, or one SQLite file."""
    url = (
        request.getfixturevalue("redis_store_url")
        if request.param == "redis"
        else f"sqlite:///{tmp_path / 'shared.db'}"
    )
    env = {"GATEWAY_LAST_USED_FLUSH_SECONDS": "0.5"}
    config_tenant = TenantSpec("cfg-team")  # the same file on both
    pair = [GatewayProcess(tmp_path, sim.url, [config_tenant], store_url=url, env=env) for _ in "ab"]
    for gw in pair:
        gw.start()
    yield url, pair
    for gw in pair:
        gw.stop()


def test_store_changes_reach_every_replica_within_a_second_and_survive_a_restart(
    two_replicas: tuple[str, list[GatewayProcess]],
) -> None:
    url, (a, b) = two_replicas
    tenant = TenantRecord("api-team", webhook_secret="whsec", limits=Limits(requests_per_minute=1000))
    in_store(url, lambda s: s.create_tenant(tenant, audit("tenant.create", "api-team")))
    key = api_key(f"key_{secrets.token_hex(8)}", "api-team", NEW_SECRET, created_at=time.time())
    since = time.monotonic()
    in_store(url, lambda s: s.create_key(key, audit("key.create", "api-team")))
    within_a_second([a, b], {NEW_SECRET: 200}, since)
    scrape = httpx.get(f"{b.url}/metrics", timeout=5).text  # the new tenant's series, at zero
    assert 'gateway_credits_charged_total{tenant="api-team"} 0.0' in scrape

    # key_id in the access log line, last_used_at written within the (shortened) flush interval
    wait_until(lambda: any(line.get("key_id") == key.id for line in b.access_log()), 5, 0.05, "key_id logged")
    assert all(NEW_SECRET not in line for line in b.log_text().splitlines())
    wait_until(lambda: in_store(url, lambda s: s.get_key(key.id)).last_used_at, 5, 0.1, "last_used_at")  # type: ignore[union-attr]

    # rotation: the new secret at once, the old one until the grace period ends, same id
    grace_end = time.time() + 2.5
    rotation = {
        "secret_hash": key_hash("sk-gw-rotated"),
        "prefix": "sk-gw-rota",
        "previous_hash": key_hash(NEW_SECRET),
        "previous_expires_at": grace_end,
    }
    since = time.monotonic()
    in_store(url, lambda s: s.update_key(key.id, rotation, audit("key.rotate", "api-team")))
    within_a_second([a, b], {"sk-gw-rotated": 200}, since)
    assert status(a, NEW_SECRET) == 200 and status(b, NEW_SECRET) == 200
    wait_until(lambda: time.time() > grace_end, 5, 0.05, "grace end")
    assert status(a, NEW_SECRET) == 401 and status(b, NEW_SECRET) == 401
    wait_until(lambda: [ln for ln in b.access_log() if ln.get("key_id") == key.id][-1]["status"] == 200, 5)

    # a lowered limit, a disabled tenant
    since = time.monotonic()
    in_store(
        url,
        lambda s: s.update_tenant(
            "api-team", {"limits": {"requests_per_minute": 1}}, time.time(), audit("tenant.update", "api-team")
        ),
    )

    def limited(gw: GatewayProcess) -> bool:
        r = probe(gw.url, "/v1/models", "sk-gw-rotated")
        return r.getheader("x-ratelimit-limit-requests") == "1" or r.status == 429

    for gw in (a, b):
        wait_until(lambda gw=gw: limited(gw), 3, 0.02, "the lowered limit")  # type: ignore[misc]
    assert time.monotonic() - since < 1.0
    assert status(a, "sk-gw-rotated") == 429
    since = time.monotonic()
    in_store(
        url, lambda s: s.update_tenant("api-team", {"enabled": False}, time.time(), audit("tenant.update", "api-team"))
    )
    within_a_second([a, b], {"sk-gw-rotated": 403}, since)
    in_store(
        url,
        lambda s: s.update_tenant(
            "api-team",
            {"enabled": True, "limits": {"requests_per_minute": None}},
            time.time(),
            audit("tenant.update", "api-team"),
        ),
    )

    # an expiry (checked at request time) and a revocation
    expiring = api_key(f"key_{secrets.token_hex(8)}", "api-team", "sk-gw-expiring", expires_at=time.time() + 1.5)
    in_store(url, lambda s: s.create_key(expiring, audit("key.create", "api-team")))
    within_a_second([a, b], {"sk-gw-expiring": 200}, time.monotonic())
    wait_until(lambda: time.time() >= expiring.expires_at, 5, 0.02)  # type: ignore[operator]
    within_a_second([a, b], {"sk-gw-expiring": 401}, time.monotonic())
    since = time.monotonic()
    in_store(url, lambda s: s.update_key(key.id, {"revoked_at": time.time()}, audit("key.revoke", "api-team")))
    within_a_second([a, b], {"sk-gw-rotated": 401}, since)

    # restart every process: nothing above is lost or undone
    for gw in (a, b):
        gw.stop()
    cfg_key = a.tenants["cfg-team"].key
    minted = api_key(f"key_{secrets.token_hex(8)}", "api-team", "sk-gw-after", created_at=time.time())
    in_store(url, lambda s: s.create_key(minted, audit("key.create", "api-team")))
    for gw in (a, b):
        gw.start()
        assert status(gw, "sk-gw-after") == 200 and status(gw, cfg_key) == 200
        assert (
            status(gw, "sk-gw-rotated") == 401 and status(gw, NEW_SECRET) == 401 and status(gw, "sk-gw-expiring") == 401
        )


def test_a_revocation_during_a_rotation_grace_refuses_both_secrets_on_every_replica_within_a_second(
    two_replicas: tuple[str, list[GatewayProcess]],
) -> None:
    """Through the admin API of one replica: a key rotated with an hour's grace, then
    revoked. The new secret and the previous one are refused at once on both replicas
    (the 1 s bound), not when the grace would have ended."""
    _, (a, b) = two_replicas
    admin = httpx.Client(base_url=a.url + "/admin/v1", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
    with admin:
        assert admin.post("/tenants", json={"id": "grace-team"}).status_code == 201
        minted = admin.post("/tenants/grace-team/keys", json={"name": "svc"}).json()
        old = minted["secret"]
        rotated = admin.post(f"/keys/{minted['id']}/rotate", json={"grace_seconds": 3600}).json()
        new = rotated["secret"]
        assert rotated["previous_secret_expires_at"] > time.time() + 3500
        within_a_second([a, b], {new: 200, old: 200}, time.monotonic())
        since = time.monotonic()
        assert admin.delete(f"/keys/{minted['id']}").status_code == 200
    within_a_second([a, b], {new: 401, old: 401}, since)


def test_a_key_minted_in_the_store_works_on_both_workers_within_a_second(tmp_path: Path, sim: Simulator) -> None:
    gw = GatewayProcess(tmp_path, sim.url, [TenantSpec("cfg-team")], workers=2)
    gw.start()
    try:
        url = f"sqlite:///{tmp_path / f'gw-{gw.port}.db'}"
        key = api_key(f"key_{secrets.token_hex(8)}", "cfg-team", NEW_SECRET, created_at=time.time())
        since = time.monotonic()
        in_store(url, lambda s: s.create_key(key, audit("key.create", "cfg-team")))
        within_a_second([gw], {NEW_SECRET: 200}, since)
        # every worker: a run of answers all 200 (connections land on either worker)
        assert all(status(gw, NEW_SECRET) == 200 for _ in range(20))
        since = time.monotonic()
        in_store(url, lambda s: s.update_key(key.id, {"revoked_at": time.time()}, audit("key.revoke", "cfg-team")))
        within_a_second([gw], {NEW_SECRET: 401}, since)
        assert all(status(gw, NEW_SECRET) == 401 for _ in range(20))
    finally:
        gw.stop()
