"""One contract for every store: the same tests run against SQLiteStore and RedisStore.

The gateway relies on the store for exactness (quotas hold, each task settles once), so
these tests pin the semantics of gateway/store/base.py (and the rules of rules.py, which
the Redis scripts restate in Lua) with an explicit clock, check that
refusals change nothing, and race concurrent callers in one event loop and across two OS
processes on one file / one Redis. Every test runs with the process in a timezone far from
UTC (the `host_zone` fixture): budgets count UTC days whatever the host's zone.

Redis: conftest's `redis_url` (a private redis-server, or GATEWAY_TEST_REDIS_URL when
given). Each test uses its own key prefix and deletes only its own keys.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.store.base import (
    ALL_LIMITS,
    DEAD_EVENT_RETENTION,
    LAST_ERROR_MAX,
    ORPHAN_KEEP_SECONDS,
    Admission,
    AuditEntry,
    Charge,
    DirectorySnapshot,
    KeyLimits,
    KeyRecord,
    LedgerRow,
    Limits,
    RateInfo,
    Store,
    StoredResponse,
    StoreUnavailable,
    TaskRecord,
    TenantRecord,
    Usage,
)
from gateway.store.rules import (
    _day_key,
    bucket_info,
    bucket_retry_after,
    bucket_take,
    day_key,
    month_key,
    seconds_to_next_day,
    seconds_to_next_month,
)

NO_LIMITS = Limits()
T0 = datetime(2026, 1, 15, 12, 0, 0, tzinfo=UTC).timestamp()
TENANT = "acme"
OTHER = "globex"
PRICE = 10
HOOK = "https://hooks.acme.example/runway"
TRICKY = 'ünïcødé "quotes" \\ / \n\t 🎬 \u2028 <script>'  # survives JSON in Python and Lua


# --- fixtures ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreSpec:
    """How to open one store; also handed to child processes for the cross-process race."""

    kind: str  # "sqlite" | "redis"
    target: str  # SQLite file path or Redis URL
    prefix: str = ""

    def make(self) -> Store:
        if self.kind == "sqlite":
            from gateway.store.sqlite import SQLiteStore

            return SQLiteStore(self.target)
        from gateway.store.redis import RedisStore

        return RedisStore(self.target, prefix=self.prefix)


# Zones far from UTC, with their offset in January: at T0 (noon UTC) Kiritimati is already
# on the next day; around midnight UTC Los Angeles is still on the day before.
HOST_ZONES = {"Pacific/Kiritimati": 14 * 3600, "America/Los_Angeles": -8 * 3600}


@pytest.fixture(autouse=True)
def host_zone(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test with the process in a zone far from UTC (TZ + time.tzset()), so a day
    or month computed in local time instead of UTC shows; parametrize it indirectly for
    another zone. Child processes inherit it through the environment."""
    zone = getattr(request, "param", "Pacific/Kiritimati")
    saved = os.environ.get("TZ")
    os.environ["TZ"] = zone
    time.tzset()
    _day_key.cache_clear()  # a label cached under the previous test's zone would hide this one's
    try:
        assert time.localtime(T0).tm_gmtoff == HOST_ZONES[zone], (
            f"no timezone data for {zone}: the test would run in UTC"
        )
        yield zone
    finally:
        if saved is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = saved
        time.tzset()
        _day_key.cache_clear()


@pytest.fixture(params=["sqlite", "redis"])
def store_spec(request: pytest.FixtureRequest, tmp_path: Path) -> StoreSpec:
    if request.param == "sqlite":
        return StoreSpec("sqlite", str(tmp_path / "gateway.db"))
    url = request.getfixturevalue("redis_url")
    return StoreSpec("redis", url, f"gwtest:{uuid.uuid4().hex[:8]}:")


@pytest.fixture
async def store(store_spec: StoreSpec) -> AsyncIterator[Store]:
    s = store_spec.make()
    await s.open()
    try:
        yield s
    finally:
        await s.close()
        if store_spec.kind == "redis":
            await _delete_prefix(store_spec.target, store_spec.prefix)


async def _delete_prefix(url: str, prefix: str) -> None:
    """Delete this test's keys only (SCAN MATCH prefix*), never the whole database."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=500)]
        for i in range(0, len(keys), 500):
            await client.delete(*keys[i : i + 500])
    finally:
        await client.aclose()


# --- helpers ----------------------------------------------------------------------------


def new_rid() -> str:
    return f"req_{uuid.uuid4().hex}"


def reservation(
    rid: str | None = None, *, tenant: str = TENANT, now: float = T0, hook: str = "", credits: int = PRICE
) -> TaskRecord:
    return TaskRecord(
        rid=rid or new_rid(),
        tenant_id=tenant,
        hook=hook,
        credits=credits,
        created_at=now,
        updated_at=now,
        next_poll_at=now + 5,
        meta={"model": "gen2"},
    )


def task_obj(task_id: str, status: str, updated: str = "2026-01-15T12:00:00Z", **extra: Any) -> dict[str, Any]:
    return {"id": task_id, "status": status, "updatedAt": updated, **extra}


async def admit(
    store: Store,
    limits: Limits,
    *,
    now: float = T0,
    tenant: str = TENANT,
    credits: int = PRICE,
    hook: str = "",
    rid: str | None = None,
) -> tuple[Admission, TaskRecord]:
    rec = reservation(rid, tenant=tenant, now=now, hook=hook, credits=credits)
    adm = await store.admit_create(tenant, limits, Charge(credits, day_key(now), month_key(now)), rec, now)
    return adm, rec


async def create(
    store: Store,
    *,
    limits: Limits = NO_LIMITS,
    now: float = T0,
    tenant: str = TENANT,
    hook: str = "",
    credits: int = PRICE,
    rid: str | None = None,
) -> tuple[TaskRecord, str]:
    """Admit and record the upstream's PENDING answer, as POST /runway/tasks does."""
    adm, rec = await admit(store, limits, now=now, tenant=tenant, credits=credits, hook=hook, rid=rid)
    assert adm.ok, adm
    task_id = f"task-{uuid.uuid4().hex[:12]}"
    res = await store.apply_update(rec.rid, tenant, task_obj(task_id, "PENDING"), now, refund_failed=True)
    assert res.applied and res.record is not None and res.record.task_id == task_id
    assert res.event_id is None  # SUBMITTING -> PENDING is the create's own answer, no webhook
    return res.record, task_id


async def nonzero_active(store: Store) -> dict[str, int]:
    return {k: v for k, v in (await store.active_by_tenant()).items() if v}


# --- token buckets ----------------------------------------------------------------------


async def test_request_bucket_is_exact_with_an_explicit_clock(store: Store) -> None:
    limits = Limits(requests_per_minute=6)
    for i in range(6):
        adm = await store.take_request(TENANT, limits, T0)
        assert adm.ok and adm.limit is None and adm.retry_after == 0
        assert adm.rate == RateInfo(6, 5 - i, (6 - (5 - i)) * 10.0)
    refused = await store.take_request(TENANT, limits, T0)
    assert not refused.ok and refused.limit == "requests_per_minute" and refused.code == "rate_limit_exceeded"
    assert refused.retry_after == 10.0
    assert refused.rate == RateInfo(6, 0, 60.0)
    # Half a token after 5 s: still refused, and the refusal did not spend the half.
    half = await store.take_request(TENANT, limits, T0 + 5)
    assert not half.ok and half.retry_after == bucket_retry_after(0.5, 6) == 5.0
    assert half.rate == bucket_info(0.5, 6)
    # One token every 60/N = 10 s.
    one = await store.take_request(TENANT, limits, T0 + 10)
    assert one.ok and one.rate == RateInfo(6, 0, 60.0)
    assert not (await store.take_request(TENANT, limits, T0 + 10)).ok
    # Full again after a minute; never above capacity.
    full = await store.take_request(TENANT, limits, T0 + 1000)
    assert full.ok and full.rate == RateInfo(6, 5, 10.0)


async def test_request_bucket_matches_the_reference_model_to_the_bit(store: Store) -> None:
    """Irregular times and a capacity that does not divide 60: every level the store keeps
    must be the double `bucket_take` computes, or headers and retry-after drift."""
    cap, tokens, ts = 7, None, 0.0
    limits = Limits(requests_per_minute=cap)
    for k in range(60):
        now = T0 + k * 0.37 + (k % 3) * 0.011
        level, ok = bucket_take(tokens, ts, cap, now)
        adm = await store.take_request(TENANT, limits, now)
        assert adm.ok == ok and adm.rate == bucket_info(level, cap), k
        assert adm.retry_after == (0.0 if ok else bucket_retry_after(level, cap)), k
        if ok:
            tokens, ts = level, now
    # The same model through admit_create's tasks_per_minute bucket.
    tokens, ts = None, 0.0
    for k in range(60):
        now = T0 + k * 0.37 + (k % 3) * 0.011
        level, ok = bucket_take(tokens, ts, cap, now)
        adm, _ = await admit(store, Limits(tasks_per_minute=cap), tenant=OTHER, now=now)
        assert adm.ok == ok and adm.rate == bucket_info(level, cap), k
        assert adm.retry_after == (0.0 if ok else bucket_retry_after(level, cap)), k
        if ok:
            tokens, ts = level, now


async def test_unlimited_request_needs_no_bucket(store: Store) -> None:
    adm = await store.take_request(TENANT, Limits(), T0)
    assert adm.ok and adm.rate is None


async def test_create_draws_both_buckets_and_reports_the_tightest(store: Store) -> None:
    limits = Limits(requests_per_minute=10, tasks_per_minute=3)
    for i in range(3):
        adm, _ = await admit(store, limits)
        assert adm.ok and adm.rate == RateInfo(3, 2 - i, (3 - (2 - i)) * 20.0)
    refused, rec = await admit(store, limits)
    assert not refused.ok and refused.limit == "tasks_per_minute" and refused.code == "rate_limit_exceeded"
    assert refused.retry_after == 20.0 and refused.rate == RateInfo(3, 0, 60.0)
    assert await store.get_by_rid(rec.rid) is None
    # The refused create took no request token: 10 - 3 taken, one more now.
    assert (await store.take_request(TENANT, limits, T0)).rate == RateInfo(10, 6, 24.0)
    # Refused on requests_per_minute: that bucket is the one reported.
    tight = Limits(requests_per_minute=1, tasks_per_minute=5)
    assert (await admit(store, tight, tenant=OTHER))[0].ok
    refused, _ = await admit(store, tight, tenant=OTHER)
    assert (
        refused.limit == "requests_per_minute" and refused.retry_after == 60.0 and refused.rate == RateInfo(1, 0, 60.0)
    )


# --- all-or-nothing admission -----------------------------------------------------------

GENEROUS = dict(
    requests_per_minute=100,
    tasks_per_minute=50,
    max_active_tasks=40,
    tasks_per_day=30,
    credits_per_day=1000,
    credits_per_month=2000,
)
TIGHT = dict(
    requests_per_minute=3,
    tasks_per_minute=3,
    max_active_tasks=3,
    tasks_per_day=3,
    credits_per_day=35,
    credits_per_month=35,
)


async def _history(store: Store, tenant: str, limits: Limits, n: int) -> None:
    for _ in range(n):
        adm, _ = await admit(store, limits, tenant=tenant)
        assert adm.ok, adm


async def _probe(store: Store, tenant: str, limits: Limits, relaxed: Limits) -> tuple[Any, ...]:
    """Everything a refusal could have disturbed, observed through the interface."""
    before = await store.usage(tenant, T0 + 30)
    req = await store.take_request(tenant, limits, T0 + 30)
    adm, _ = await admit(store, relaxed, tenant=tenant, now=T0 + 30)
    return before, req, adm, await store.usage(tenant, T0 + 30)


@pytest.mark.parametrize("limit", list(TIGHT))
async def test_a_refused_create_changes_no_counter(store: Store, limit: str) -> None:
    limits = Limits(**{**GENEROUS, limit: TIGHT[limit]})
    relaxed = Limits(**{**GENEROUS, limit: None})
    # Tenant "a" is refused once; twin "b" has the same history without the refusal.
    for tenant in ("a", "b"):
        await _history(store, tenant, limits, 3)
    usage_before = await store.usage("a", T0)
    refused, rec = await admit(store, limits, tenant="a")
    assert not refused.ok and refused.limit == limit, refused
    assert await store.usage("a", T0) == usage_before
    assert await store.get_by_rid(rec.rid) is None
    assert await _probe(store, "a", limits, relaxed) == await _probe(store, "b", limits, relaxed)


async def test_refusal_codes_and_retry_after(store: Store) -> None:
    await _history(store, TENANT, Limits(), 1)
    cases = {
        "max_active_tasks": ("concurrency_limit_exceeded", 1.0),
        "tasks_per_day": ("insufficient_quota", seconds_to_next_day(T0)),
        "credits_per_day": ("insufficient_quota", seconds_to_next_day(T0)),
        "credits_per_month": ("insufficient_quota", seconds_to_next_month(T0)),
    }
    for limit, (code, retry) in cases.items():
        value = 1 if limit in ("max_active_tasks", "tasks_per_day") else 15
        adm, _ = await admit(store, Limits(**{limit: value}))
        assert (adm.ok, adm.limit, adm.code, adm.retry_after) == (False, limit, code, retry)


# --- active tasks -----------------------------------------------------------------------


async def test_a_terminal_update_frees_the_active_slot(store: Store) -> None:
    limits = Limits(max_active_tasks=2)
    first, task_id = await create(store, limits=limits)
    await create(store, limits=limits)
    refused, _ = await admit(store, limits)
    assert refused.limit == "max_active_tasks"
    assert await nonzero_active(store) == {TENANT: 2}
    res = await store.apply_update(first.rid, TENANT, task_obj(task_id, "SUCCEEDED"), T0 + 1, refund_failed=True)
    assert res.finished and res.record is not None and not res.record.active and res.record.settled
    assert (await store.usage(TENANT, T0 + 1)).active == 1
    assert (await admit(store, limits, now=T0 + 1))[0].ok


async def test_expired_tasks_free_their_slot_and_keep_the_charge(store: Store) -> None:
    limits = Limits(max_active_tasks=2)
    old, _ = await create(store, limits=limits)
    submitting = (await admit(store, limits))[1]
    assert not (await admit(store, limits, now=T0 + 10))[0].ok
    assert await store.expire_tasks(T0 + 3599, 3600, 3600) == []
    expired = await store.expire_tasks(T0 + 3600, 3600, 3600)  # created at or before now - timeout
    assert sorted(r.rid for r in expired) == sorted([old.rid, submitting.rid])
    assert all(r.timed_out and not r.active and not r.settled for r in expired)
    assert await store.expire_tasks(T0 + 3600, 3600, 3600) == []
    usage = await store.usage(TENANT, T0 + 3600)
    assert usage == Usage(
        active=0, tasks_today=2, credits_today=2 * PRICE, credits_this_month=2 * PRICE, tasks_this_month=2
    )
    assert await nonzero_active(store) == {}
    assert (await admit(store, limits, now=T0 + 3600))[0].ok
    # A later terminal update still applies, does not free the slot twice, and refunds.
    res = await store.apply_update(
        old.rid, TENANT, task_obj(old.task_id or "", "FAILED"), T0 + 3700, refund_failed=True
    )
    assert res.applied and res.finished and res.refunded_credits == PRICE
    assert (await store.usage(TENANT, T0 + 3700)).active == 1


async def test_unknown_outcomes_free_their_slot_after_the_unknown_timeout(store: Store) -> None:
    limits = Limits(max_active_tasks=3)
    unknown = (await admit(store, limits))[1]
    await store.mark_unknown(unknown.rid, T0 + 30)
    submitting = (await admit(store, limits))[1]  # still waiting for the upstream: not touched
    known, _ = await create(store, limits=limits)
    assert not (await admit(store, limits, now=T0 + 40))[0].ok
    assert await store.expire_tasks(T0 + 299, 3600, 300) == []
    expired = await store.expire_tasks(T0 + 300, 3600, 300)
    assert [(r.rid, r.status, r.timed_out, r.active, r.settled) for r in expired] == [
        (unknown.rid, "UNKNOWN", True, False, False)
    ]
    assert await store.expire_tasks(T0 + 400, 3600, 300) == []
    usage = await store.usage(TENANT, T0 + 400)  # slot freed, charge kept
    assert usage == Usage(
        active=2, tasks_today=3, credits_today=3 * PRICE, credits_this_month=3 * PRICE, tasks_this_month=3
    )
    assert (await admit(store, limits, now=T0 + 400))[0].ok
    # A callback that identifies it later still applies, without freeing the slot twice, and FAILED refunds.
    late = "task-late-" + uuid.uuid4().hex[:6]
    res = await store.apply_update(unknown.rid, TENANT, task_obj(late, "RUNNING"), T0 + 500, refund_failed=True)
    assert res.applied and res.record is not None and res.record.task_id == late and not res.record.active
    assert (await store.get_by_task_id(TENANT, late)) is not None
    res = await store.apply_update(unknown.rid, TENANT, task_obj(late, "FAILED"), T0 + 501, refund_failed=True)
    assert res.finished and res.refunded_credits == PRICE
    assert (await store.usage(TENANT, T0 + 501)).active == 3
    # The other two time out with task_timeout only; an identified unknown is not an unknown any more.
    assert {r.rid for r in await store.expire_tasks(T0 + 3600, 3600, 300)} == {submitting.rid, known.rid}


async def test_an_unknown_outcome_identified_in_time_is_not_expired_as_unknown(store: Store) -> None:
    rec = (await admit(store, Limits()))[1]
    await store.mark_unknown(rec.rid, T0 + 30)
    await store.apply_update(rec.rid, TENANT, task_obj("task-found", "PENDING"), T0 + 60, refund_failed=True)
    assert await store.expire_tasks(T0 + 1000, 3600, 300) == []
    assert (await store.usage(TENANT, T0 + 1000)).active == 1


async def test_a_reservation_lost_in_flight_settles_as_an_unknown_outcome(store: Store) -> None:
    """A create whose gateway died before the relay's answer was recorded stays SUBMITTING:
    once `in_flight` seconds passed since its admission, the sweep marks it UNKNOWN and it
    frees its slot `unknown_timeout` after admission, like a create that timed out; its
    charge stands. Reservations answered in time (or refunded) are never touched."""
    limits, sweep = Limits(max_active_tasks=4), {"timeout": 3600.0, "unknown_timeout": 300.0, "in_flight": 35.0}
    lost = (await admit(store, limits))[1]
    answered, _ = await create(store, limits=limits)
    refunded = (await admit(store, limits))[1]
    assert await store.settle_not_created(refunded.rid, T0 + 1)
    young = (await admit(store, limits, now=T0 + 20))[1]
    assert await store.expire_tasks(T0 + 34, **sweep) == []
    # Two replicas sweep at once: the reservation is marked once, by one of them.
    first, second = await asyncio.gather(store.expire_tasks(T0 + 35, **sweep), store.expire_tasks(T0 + 35, **sweep))
    marked = first + second
    assert [(r.rid, r.status, r.active, r.timed_out, r.settled) for r in marked] == [
        (lost.rid, "UNKNOWN", True, False, False)
    ]
    stored = await store.get_by_rid(lost.rid)
    assert stored is not None and (stored.status, stored.active, stored.updated_at) == ("UNKNOWN", True, T0 + 35)
    await store.apply_update(young.rid, TENANT, task_obj("task-young", "PENDING"), T0 + 40, refund_failed=True)
    assert await store.expire_tasks(T0 + 299, **sweep) == []
    assert (await store.usage(TENANT, T0 + 299)).active == 3
    expired = await store.expire_tasks(T0 + 300, **sweep)  # unknown_timeout after admission, as a timed-out create
    assert [(r.rid, r.status, r.active, r.timed_out, r.settled) for r in expired] == [
        (lost.rid, "UNKNOWN", False, True, False)
    ]
    assert await store.expire_tasks(T0 + 400, **sweep) == []
    usage = await store.usage(TENANT, T0 + 400)  # the slot freed, the charge kept; the refund stays refunded
    assert usage == Usage(
        active=2, tasks_today=3, credits_today=3 * PRICE, credits_this_month=3 * PRICE, tasks_this_month=3
    )
    assert {r.rid for r in await store.expire_tasks(T0 + 3620, **sweep)} == {answered.rid, young.rid}
    # A callback that identifies it later still applies, without freeing the slot twice; FAILED refunds.
    res = await store.apply_update(lost.rid, TENANT, task_obj("task-lost", "FAILED"), T0 + 3700, refund_failed=True)
    assert res.finished and res.refunded_credits == PRICE and res.record is not None
    assert (res.record.task_id, res.record.active) == ("task-lost", False)
    assert (await store.usage(TENANT, T0 + 3700)).active == 0
    # unknown_timeout shorter than in_flight: marked and freed by the same sweep, returned once.
    quick = (await admit(store, limits, now=T0 + 4000))[1]
    [swept] = await store.expire_tasks(T0 + 4035, 3600, 10, in_flight=35)
    assert (swept.rid, swept.status, swept.active, swept.timed_out) == (quick.rid, "UNKNOWN", False, True)
    assert (await store.usage(TENANT, T0 + 4035)).active == 0


# --- periods ----------------------------------------------------------------------------


@pytest.mark.parametrize("host_zone", list(HOST_ZONES), indirect=True)
async def test_day_and_month_budgets_roll_over_at_utc_midnight(store: Store, host_zone: str) -> None:
    eve = datetime(2026, 1, 31, 23, 59, 59, tzinfo=UTC).timestamp()
    after = eve + 2
    local_days = [datetime.fromtimestamp(t).strftime("%Y-%m-%d") for t in (eve, after)]
    assert local_days != ["2026-01-31", "2026-02-01"], f"in {host_zone} local days are UTC days: nothing is tested"
    limits = Limits(tasks_per_day=1, credits_per_day=PRICE, credits_per_month=PRICE)
    adm, late = await admit(store, limits, now=eve)
    assert adm.ok and late.charge_day == "2026-01-31" and late.charge_month == "2026-01"
    refused, _ = await admit(store, limits, now=eve)
    assert refused.limit == "tasks_per_day" and refused.retry_after == 1.0
    refused, _ = await admit(store, Limits(credits_per_month=PRICE), now=eve)
    assert refused.limit == "credits_per_month" and refused.retry_after == 1.0
    assert await store.usage(TENANT, after) == Usage(active=1)
    adm, fresh = await admit(store, limits, now=after)
    assert adm.ok and fresh.charge_day == "2026-02-01" and fresh.charge_month == "2026-02"
    assert await store.usage(TENANT, after) == Usage(
        active=2, tasks_today=1, credits_today=PRICE, credits_this_month=PRICE, tasks_this_month=1
    )
    # Settling yesterday's reservation gives back its slot, not today's budget.
    assert await store.settle_not_created(late.rid, after)
    assert await store.usage(TENANT, after) == Usage(
        active=1, tasks_today=1, credits_today=PRICE, credits_this_month=PRICE, tasks_this_month=1
    )


# --- settlement ---------------------------------------------------------------------------


async def test_settle_not_created_refunds_in_full_exactly_once(store: Store) -> None:
    limits = Limits(max_active_tasks=1, tasks_per_day=1, credits_per_day=PRICE, credits_per_month=PRICE)
    adm, rec = await admit(store, limits)
    assert adm.ok
    assert await store.usage(TENANT, T0) == Usage(1, 1, PRICE, PRICE, 1)
    assert await store.settle_not_created(rec.rid, T0 + 1)
    assert await store.usage(TENANT, T0 + 1) == Usage()
    assert await store.get_by_rid(rec.rid) is None
    assert not await store.settle_not_created(rec.rid, T0 + 1)
    assert await store.usage(TENANT, T0 + 1) == Usage()
    assert (await admit(store, limits, now=T0 + 1))[0].ok


async def test_mark_unknown_keeps_the_charge_until_settled(store: Store) -> None:
    _, rec = await admit(store, Limits())
    await store.mark_unknown(rec.rid, T0 + 30)
    got = await store.get_by_rid(rec.rid)
    assert got is not None and got.status == "UNKNOWN" and got.active and not got.settled
    assert await store.usage(TENANT, T0 + 30) == Usage(1, 1, PRICE, PRICE, 1)
    # Concurrent settlements of one reservation: one wins.
    results = await asyncio.gather(*(store.settle_not_created(rec.rid, T0 + 31) for _ in range(10)))
    assert sum(results) == 1
    assert await store.usage(TENANT, T0 + 31) == Usage()


async def test_only_unanswered_reservations_settle_as_not_created(store: Store) -> None:
    rec, _ = await create(store)
    await store.mark_unknown(rec.rid, T0 + 1)  # no effect after PENDING
    assert (await store.get_by_rid(rec.rid)).status == "PENDING"  # type: ignore[union-attr]
    assert not await store.settle_not_created(rec.rid, T0 + 1)
    assert await store.usage(TENANT, T0 + 1) == Usage(1, 1, PRICE, PRICE, 1)
    assert not await store.settle_not_created("req_unknown", T0)


# --- the task compare-and-set ---------------------------------------------------------------


async def test_stale_out_of_order_and_duplicate_updates_are_no_ops(store: Store) -> None:
    rec, tid = await create(store, hook=HOOK)
    running = task_obj(tid, "RUNNING", "2026-01-15T12:00:10Z", progress=0.2)
    res = await store.apply_update(rec.rid, TENANT, running, T0 + 10, refund_failed=True)
    assert (res.applied, res.status_changed, res.previous_status, res.finished) == (True, True, "PENDING", False)
    assert res.event_id is not None and res.record is not None and res.record.task == running
    # An earlier state after a later one: no-op.
    res = await store.apply_update(
        rec.rid, TENANT, task_obj(tid, "PENDING", "2026-01-15T12:00:05Z"), T0 + 11, refund_failed=True
    )
    assert not res.applied and res.event_id is None and res.record is not None and res.record.status == "RUNNING"
    # Progress within a status: replaced, no event.
    progress = task_obj(tid, "RUNNING", "2026-01-15T12:00:20Z", progress=0.6)
    res = await store.apply_update(rec.rid, TENANT, progress, T0 + 20, refund_failed=True)
    assert res.applied and not res.status_changed and res.event_id is None and res.record.task == progress  # type: ignore[union-attr]
    # Older progress arriving late: no-op.
    res = await store.apply_update(rec.rid, TENANT, running, T0 + 21, refund_failed=True)
    assert not res.applied and res.record.task == progress  # type: ignore[union-attr]
    # No status at all: no-op.
    assert not (await store.apply_update(rec.rid, TENANT, {"id": tid}, T0 + 22, refund_failed=True)).applied
    done = task_obj(tid, "SUCCEEDED", "2026-01-15T12:01:00Z", output=["https://cdn.example/v.mp4"])
    res = await store.apply_update(rec.rid, TENANT, done, T0 + 60, refund_failed=True)
    assert res.applied and res.finished and res.status_changed and res.refunded_credits == 0 and res.event_id
    # Terminal is never overwritten: not by an earlier state, another terminal, or itself.
    for late in (running, task_obj(tid, "FAILED", "2026-01-15T12:02:00Z"), done):
        res = await store.apply_update(rec.rid, TENANT, late, T0 + 70, refund_failed=True)
        assert (res.applied, res.finished, res.refunded_credits, res.event_id) == (False, False, 0, None)
        assert res.previous_status == "SUCCEEDED" and res.record.task == done  # type: ignore[union-attr]
    assert await store.webhook_pending() == 2
    assert (await store.get_by_rid(rec.rid)).task == done  # type: ignore[union-attr]


async def test_unknown_rid_without_adoption_is_ignored(store: Store) -> None:
    res = await store.apply_update("req_nope", TENANT, task_obj("t-x", "RUNNING"), T0, refund_failed=True)
    assert res.record is None and not res.applied and not res.adopted
    assert await store.get_by_task_id(TENANT, "t-x") is None


async def test_concurrent_failed_updates_refund_and_notify_exactly_once(store: Store) -> None:
    rec, tid = await create(store, hook=HOOK)
    failed = task_obj(tid, "FAILED", "2026-01-15T12:05:00Z", failure="boom")
    results = await asyncio.gather(
        *(store.apply_update(rec.rid, TENANT, failed, T0 + 300, refund_failed=True) for _ in range(20))
    )
    assert sum(r.refunded_credits for r in results) == PRICE
    assert sum(r.finished for r in results) == 1 and sum(r.applied for r in results) == 1
    assert len([r.event_id for r in results if r.event_id]) == 1
    assert await store.webhook_pending() == 1
    assert await store.usage(TENANT, T0 + 300) == Usage(
        active=0, tasks_today=1, credits_today=0, credits_this_month=0, tasks_this_month=1
    )
    # Applied twice more, later: still refunded once.
    again = await store.apply_update(rec.rid, TENANT, failed, T0 + 301, refund_failed=True)
    assert again.refunded_credits == 0 and await store.usage(TENANT, T0 + 301) == Usage(0, 1, 0, 0, 1)


@pytest.mark.parametrize(
    "status,refund,expected", [("FAILED", False, 0), ("CANCELLED", True, PRICE), ("SUCCEEDED", True, 0)]
)
async def test_refund_depends_on_status_and_setting(store: Store, status: str, refund: bool, expected: int) -> None:
    rec, tid = await create(store)
    res = await store.apply_update(rec.rid, TENANT, task_obj(tid, status), T0 + 5, refund_failed=refund)
    assert res.finished and res.refunded_credits == expected
    assert (await store.usage(TENANT, T0 + 5)).credits_today == PRICE - expected


async def test_adoption_of_an_unknown_rid_charges_once(store: Store) -> None:
    rid = new_rid()
    adopt = TaskRecord(
        rid=rid, tenant_id=TENANT, credits=PRICE, hook=HOOK, created_at=T0, updated_at=T0, next_poll_at=T0 + 5
    )
    running = task_obj("t-adopted", "RUNNING")
    results = await asyncio.gather(
        *(store.apply_update(rid, TENANT, running, T0, refund_failed=True, adopt=adopt) for _ in range(5))
    )
    assert sum(r.adopted for r in results) == 1 and sum(r.status_changed for r in results) == 1
    assert await store.usage(TENANT, T0) == Usage(1, 1, PRICE, PRICE, 1)
    got = await store.get_by_task_id(TENANT, "t-adopted")
    assert got is not None and got.rid == rid and got.status == "RUNNING" and got.active
    assert len([r for r in results if r.event_id]) == 1  # SUBMITTING -> RUNNING is news for the tenant
    done = await store.apply_update(
        rid, TENANT, task_obj("t-adopted", "SUCCEEDED"), T0 + 9, refund_failed=True, adopt=adopt
    )
    assert done.finished and not done.adopted
    assert await store.usage(TENANT, T0 + 9) == Usage(0, 1, PRICE, PRICE, 1)


async def test_adoption_with_a_terminal_update(store: Store) -> None:
    rid = new_rid()
    adopt = TaskRecord(rid=rid, tenant_id=TENANT, credits=PRICE, created_at=T0, updated_at=T0)
    res = await store.apply_update(rid, TENANT, task_obj("t-late", "FAILED"), T0, refund_failed=True, adopt=adopt)
    assert res.adopted and res.finished and res.refunded_credits == PRICE
    assert await store.usage(TENANT, T0) == Usage(0, 1, 0, 0, 1)
    assert await nonzero_active(store) == {}


# --- webhook outbox -----------------------------------------------------------------------


async def test_webhook_events_of_one_task_go_in_order_under_a_lease(store: Store) -> None:
    rec, tid = await create(store, hook=HOOK)
    running = task_obj(tid, "RUNNING", "2026-01-15T12:00:10Z")
    done = task_obj(tid, "SUCCEEDED", "2026-01-15T12:00:20Z")
    e1 = (await store.apply_update(rec.rid, TENANT, running, T0 + 10, refund_failed=True)).event_id
    e2 = (await store.apply_update(rec.rid, TENANT, done, T0 + 20, refund_failed=True)).event_id
    assert e1 and e2 and e1 != e2 and await store.webhook_pending() == 2
    now = T0 + 30
    claimed = await store.claim_webhooks(now, 10, lease=20)
    assert [e.event_id for e in claimed] == [e1]  # the 2nd waits for the 1st
    ev = claimed[0]
    assert (ev.rid, ev.tenant_id, ev.url, ev.attempts) == (rec.rid, TENANT, HOOK, 0)
    assert orjson.loads(ev.body) == {"task": running} and ev.body == orjson.dumps({"task": running})
    assert await store.claim_webhooks(now + 19, 10, lease=20) == []  # leased
    again = await store.claim_webhooks(now + 20, 10, lease=20)  # lease over: re-claimed
    assert [e.event_id for e in again] == [e1]
    await store.finish_webhook(e1, delivered=False, attempts=1, next_at=now + 100, now=now)
    assert await store.claim_webhooks(now + 99, 10, lease=20) == []  # backoff, and e2 still waits
    retried = await store.claim_webhooks(now + 100, 10, lease=20)
    assert [(e.event_id, e.attempts) for e in retried] == [(e1, 1)]
    await store.finish_webhook(e1, delivered=True, attempts=2, next_at=None, now=now + 100)
    assert await store.webhook_pending() == 1
    second = await store.claim_webhooks(now + 100, 10, lease=20)
    assert [e.event_id for e in second] == [e2] and second[0].seq > ev.seq
    assert orjson.loads(second[0].body) == {"task": done}
    await store.finish_webhook(e2, delivered=False, attempts=20, next_at=None, now=now + 100)  # gave up: dead
    assert await store.webhook_pending() == 0
    assert await store.claim_webhooks(now + 10_000, 10, lease=20) == []


async def test_webhooks_of_different_tasks_do_not_wait_for_each_other(store: Store) -> None:
    a, tid_a = await create(store, hook=HOOK)
    b, tid_b = await create(store, hook=HOOK)
    plain, tid_c = await create(store)  # no hook: no events
    for rec, tid in ((a, tid_a), (b, tid_b), (plain, tid_c)):
        await store.apply_update(rec.rid, TENANT, task_obj(tid, "RUNNING"), T0 + 1, refund_failed=True)
        await store.apply_update(rec.rid, TENANT, task_obj(tid, "SUCCEEDED"), T0 + 2, refund_failed=True)
    assert await store.webhook_pending() == 4
    first = await store.claim_webhooks(T0 + 3, 1, lease=20)
    assert len(first) == 1  # limit
    rest = await store.claim_webhooks(T0 + 3, 10, lease=20)
    assert {e.rid for e in first + rest} == {a.rid, b.rid} and len(rest) == 1
    # Concurrent claimers never share an event.
    for e in first + rest:
        await store.finish_webhook(e.event_id, delivered=True, attempts=1, next_at=None, now=T0 + 3)
    batches = await asyncio.gather(*(store.claim_webhooks(T0 + 4, 10, lease=20) for _ in range(10)))
    ids = [e.event_id for batch in batches for e in batch]
    assert len(ids) == len(set(ids)) == 2
    assert await store.webhook_pending() == 2


# --- idempotency --------------------------------------------------------------------------


async def test_idempotency_states(store: Store) -> None:
    key, fp = "create-1", "fp-a"
    assert (await store.idem_begin(TENANT, key, fp, T0, lease=30)).state == "new"
    assert (await store.idem_begin(TENANT, key, fp, T0 + 1, lease=30)).state == "pending"
    assert (await store.idem_begin(TENANT, key, "fp-b", T0 + 1, lease=30)).state == "conflict"
    assert (await store.idem_begin(OTHER, key, "fp-b", T0 + 1, lease=30)).state == "new"  # per tenant
    response = StoredResponse(200, {"content-type": "application/json", "x-request-id": "r1"}, b'{"task":{"id":"t1"}}')
    await store.idem_finish(TENANT, key, response, T0 + 2, ttl=86400)
    replay = await store.idem_begin(TENANT, key, fp, T0 + 3, lease=30)
    assert replay.state == "replay" and replay.response == response
    assert (await store.idem_begin(TENANT, key, "fp-b", T0 + 3, lease=30)).state == "conflict"
    # Kept for the ttl by the caller's clock, then free.
    assert (await store.idem_begin(TENANT, key, fp, T0 + 2 + 86399, lease=30)).state == "replay"
    assert (await store.idem_begin(TENANT, key, "fp-b", T0 + 2 + 86400, lease=30)).state == "new"


async def test_idempotency_key_bound_to_an_unknown_outcome(store: Store) -> None:
    assert (await store.idem_begin(TENANT, "k", "fp", T0, lease=30)).state == "new"
    await store.idem_bind(TENANT, "k", "gwr_1", T0 + 3, ttl=86400)
    bound = await store.idem_begin(TENANT, "k", "fp", T0 + 4, lease=30)
    assert (bound.state, bound.rid, bound.response) == ("unknown", "gwr_1", None)
    assert (await store.idem_begin(TENANT, "k", "fp-b", T0 + 4, lease=30)).state == "conflict"
    # Neither a late finish nor a second bind of the key moves it; only its 24 h end it.
    await store.idem_finish(TENANT, "k", None, T0 + 5, ttl=86400)
    await store.idem_bind(TENANT, "k", "gwr_2", T0 + 5, ttl=86400)
    assert (await store.idem_begin(TENANT, "k", "fp", T0 + 3 + 86399, lease=30)).rid == "gwr_1"
    assert (await store.idem_begin(TENANT, "k", "fp", T0 + 3 + 86400, lease=30)).state == "new"
    # Only a key still pending binds (not a free one).
    await store.idem_bind(TENANT, "free", "gwr_3", T0, ttl=86400)
    assert (await store.idem_begin(TENANT, "free", "fp", T0, lease=30)).state == "new"


async def test_a_key_held_by_an_admitted_create_binds_when_its_holder_vanishes(store: Store) -> None:
    """The crash window: the holder was admitted (and may have sent the create upstream),
    then died before it finished or bound the key. When the lease ends the key binds to the
    reservation admit_create recorded on it, instead of letting a retry buy a second task."""
    assert (await store.idem_begin(TENANT, "k", "fp", T0, lease=30)).state == "new"
    rec = reservation(now=T0)
    charge = Charge(PRICE, day_key(T0), month_key(T0))
    assert (await store.admit_create(TENANT, NO_LIMITS, charge, rec, T0, idempotency_key="k")).ok
    assert (await store.idem_begin(TENANT, "k", "fp", T0 + 29, lease=30)).state == "pending"  # holder alive
    await store.maintain(T0 + 31)  # housekeeping keeps the orphan
    assert (await store.idem_begin(TENANT, "k", "fp-b", T0 + 31, lease=30)).state == "conflict"
    bound = await store.idem_begin(TENANT, "k", "fp", T0 + 31, lease=30)
    assert (bound.state, bound.rid) == ("unknown", rec.rid)
    assert (await store.idem_begin(TENANT, "k", "fp", T0 + 30 + ORPHAN_KEEP_SECONDS - 1, lease=30)).rid == rec.rid
    assert (await store.idem_begin(TENANT, "k", "fp", T0 + 30 + ORPHAN_KEEP_SECONDS, lease=30)).state == "new"
    # Never touched again by anyone: housekeeping drops it after the same time.
    assert (await store.idem_begin(TENANT, "gone", "fp", T0, lease=30)).state == "new"
    assert (await store.admit_create(TENANT, NO_LIMITS, charge, reservation(now=T0), T0, idempotency_key="gone")).ok
    await store.maintain(T0 + 30 + ORPHAN_KEEP_SECONDS)
    assert (await store.idem_begin(TENANT, "gone", "fp-2", T0 + 30 + ORPHAN_KEEP_SECONDS, lease=30)).state == "new"


async def test_a_finished_create_is_not_bound_by_its_admission(store: Store) -> None:
    """Recording the rid at admission changes nothing for a holder that finishes: a kept
    answer replays, a freed key (the upstream certainly created nothing) is new."""
    charge = Charge(PRICE, day_key(T0), month_key(T0))
    for key, kept in (("kept", StoredResponse(200, {}, b"{}")), ("freed", None)):
        assert (await store.idem_begin(TENANT, key, "fp", T0, lease=30)).state == "new"
        assert (await store.admit_create(TENANT, NO_LIMITS, charge, reservation(now=T0), T0, idempotency_key=key)).ok
        await store.idem_finish(TENANT, key, kept, T0 + 1, ttl=86400)
        after = await store.idem_begin(TENANT, key, "fp", T0 + 40, lease=30)
        assert after.state == ("replay" if kept else "new"), key
    # Admission never takes a key the create does not hold.
    assert (await store.admit_create(TENANT, NO_LIMITS, charge, reservation(now=T0), T0, idempotency_key="nobody")).ok
    assert (await store.idem_begin(TENANT, "nobody", "fp", T0 + 1, lease=30)).state == "new"


async def idem_lifetime(spec: StoreSpec, tenant: str, key: str, now: float) -> float:
    """Seconds from `now` the store still keeps an Idempotency-Key: the Redis hash's TTL
    (Redis's own clock: `now` is the caller's, and no real time passes in these tests), or
    the SQLite row's expires_at. 0 when the key is gone."""
    if spec.kind == "sqlite":
        import sqlite3

        with sqlite3.connect(spec.target) as db:
            row = db.execute(
                "SELECT expires_at FROM idempotency WHERE tenant = ? AND key = ?", (tenant, key)
            ).fetchone()
        return 0.0 if row is None else float(row[0]) - now
    import hashlib

    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(spec.target)
    try:
        ttl_ms = await client.pttl(f"{spec.prefix}idem:{tenant}:{hashlib.sha256(key.encode()).hexdigest()}")
    finally:
        await client.aclose()
    return max(0.0, ttl_ms / 1000)


async def test_an_orphaned_idempotency_key_outlives_its_lease_by_24_hours(store: Store, store_spec: StoreSpec) -> None:
    """The crash window: a key's holder admitted its create (the key records the rid), then
    died. However late the retry or the store's housekeeping comes, the key stays bound to
    that reservation until 24 h after the lease's end, never coming free with the lease."""
    charge = Charge(PRICE, day_key(T0), month_key(T0))
    rec = reservation(now=T0)
    assert (await store.idem_begin(TENANT, "crash", "fp", T0, lease=30)).state == "new"
    assert (await store.admit_create(TENANT, NO_LIMITS, charge, rec, T0, idempotency_key="crash")).ok
    if store_spec.kind == "redis":  # the hash itself outlives the lease (its TTL is real time)
        assert 30 + ORPHAN_KEEP_SECONDS - 5 <= await idem_lifetime(store_spec, TENANT, "crash", T0)
    await store.maintain(T0 + 100)  # housekeeping after the lease's end, before any retry
    bound = await store.idem_begin(TENANT, "crash", "fp", T0 + 100, lease=30)
    assert (bound.state, bound.rid) == ("unknown", rec.rid)
    left = await idem_lifetime(store_spec, TENANT, "crash", T0 + 100)
    assert abs(left - (30 + ORPHAN_KEEP_SECONDS - 100)) < 5, left
    await store.maintain(T0 + 30 + ORPHAN_KEEP_SECONDS - 1)
    late = await store.idem_begin(TENANT, "crash", "fp", T0 + 30 + ORPHAN_KEEP_SECONDS - 1, lease=30)
    assert (late.state, late.rid) == ("unknown", rec.rid)
    assert (await store.usage(TENANT, T0 + 100)).tasks_today == 1


async def test_idempotency_key_freed_by_none_or_an_expired_lease(store: Store) -> None:
    assert (await store.idem_begin(TENANT, "k", "fp", T0, lease=30)).state == "new"
    await store.idem_finish(TENANT, "k", None, T0 + 1, ttl=86400)  # 429/5xx
    assert (await store.idem_begin(TENANT, "k", "fp-2", T0 + 1, lease=30)).state == "new"
    # A holder that never finishes loses the key when its lease ends.
    assert (await store.idem_begin(TENANT, "k", "fp-3", T0 + 30, lease=30)).state == "conflict"
    assert (await store.idem_begin(TENANT, "k", "fp-3", T0 + 31, lease=30)).state == "new"
    # Only one of many simultaneous first requests owns the key.
    states = await asyncio.gather(*(store.idem_begin(TENANT, "race", "fp", T0, lease=30) for _ in range(20)))
    assert sorted(s.state for s in states) == ["new"] + ["pending"] * 19


# --- polling ------------------------------------------------------------------------------


async def test_claim_poll_has_one_winner_per_interval(store: Store) -> None:
    rec, tid = await create(store)  # next_poll_at = T0 + 5
    assert not await store.claim_poll(rec.rid, T0 + 4, 5)
    wins = await asyncio.gather(*(store.claim_poll(rec.rid, T0 + 5, 5) for _ in range(20)))
    assert sum(wins) == 1
    assert not await store.claim_poll(rec.rid, T0 + 9.9, 5)
    assert await store.claim_poll(rec.rid, T0 + 10, 5)
    await store.apply_update(rec.rid, TENANT, task_obj(tid, "SUCCEEDED"), T0 + 11, refund_failed=True)
    assert not await store.claim_poll(rec.rid, T0 + 100, 5)  # nothing left to poll
    assert not await store.claim_poll("req_missing", T0, 5)


async def test_claim_due_polls(store: Store) -> None:
    due1, _ = await create(store, now=T0)  # next_poll_at T0 + 5
    due2, _ = await create(store, now=T0 + 1)  # T0 + 6
    later, _ = await create(store, now=T0 + 100)  # T0 + 105
    await admit(store, Limits(), now=T0)  # no upstream id: never polled
    done, done_tid = await create(store, now=T0)
    await store.apply_update(done.rid, TENANT, task_obj(done_tid, "SUCCEEDED"), T0 + 1, refund_failed=True)
    first = await store.claim_due_polls(T0 + 10, 5, 1, 3600, 86400)
    assert [r.rid for r in first] == [due1.rid] and first[0].next_poll_at == T0 + 15  # earliest due first
    rest = await store.claim_due_polls(T0 + 10, 5, 10, 3600, 86400)
    assert [r.rid for r in rest] == [due2.rid]
    assert await store.claim_due_polls(T0 + 10, 5, 10, 3600, 86400) == []
    assert (await store.get_by_rid(due2.rid)).next_poll_at == T0 + 15  # type: ignore[union-attr]
    # Timed-out tasks: hourly, and not after give_up_after from creation.
    await store.expire_tasks(T0 + 3601, 3600, 3600)  # due1, due2 (and the SUBMITTING one) time out
    claimed = {r.rid: r for r in await store.claim_due_polls(T0 + 3601, 5, 10, 3600, 86400)}
    assert set(claimed) == {due1.rid, due2.rid, later.rid}
    assert claimed[due1.rid].timed_out and claimed[due1.rid].next_poll_at == T0 + 3601 + 3600
    assert claimed[due2.rid].timed_out and claimed[due2.rid].next_poll_at == T0 + 3601 + 3600
    assert not claimed[later.rid].timed_out and claimed[later.rid].next_poll_at == T0 + 3601 + 5
    assert {r.rid for r in await store.claim_due_polls(T0 + 3700, 5, 10, 3600, 86400)} == {later.rid}
    assert await store.claim_due_polls(T0 + 86400 + 200, 5, 10, 3600, 86400) == []


async def test_concurrent_due_poll_claims_never_share_a_task(store: Store) -> None:
    rids = {(await create(store, now=T0 + i))[0].rid for i in range(12)}
    batches = await asyncio.gather(*(store.claim_due_polls(T0 + 60, 5, 3, 3600, 86400) for _ in range(8)))
    claimed = [r.rid for batch in batches for r in batch]
    assert len(claimed) == len(set(claimed)) == 12 and set(claimed) == rids


# --- reads --------------------------------------------------------------------------------


async def test_list_tasks_order_pagination_filter_and_hidden(store: Store) -> None:
    made: list[tuple[TaskRecord, str]] = []
    for i in range(5):
        made.append(await create(store, now=T0 + i))
    # Two tasks created in the same instant: ordered by rid.
    made.append(await create(store, now=T0 + 10, rid="req_tie_a"))
    made.append(await create(store, now=T0 + 10, rid="req_tie_b"))
    await admit(store, Limits(), now=T0 + 20)  # no upstream id yet: not listed
    await create(store, now=T0 + 3, tenant=OTHER)
    _, hidden_tid = made[2]
    assert await store.hide_task(TENANT, hidden_tid)
    await store.apply_update(made[1][0].rid, TENANT, task_obj(made[1][1], "RUNNING"), T0 + 30, refund_failed=True)
    visible = [tid for rec, tid in made if tid != hidden_tid]
    newest_first = [visible[5], visible[4], *reversed(visible[:4])]

    page, more = await store.list_tasks(TENANT, limit=2)
    assert [r.task_id for r in page] == newest_first[:2] and more
    page2, more2 = await store.list_tasks(TENANT, limit=2, after=page[-1].task_id)
    assert [r.task_id for r in page2] == newest_first[2:4] and more2
    page3, more3 = await store.list_tasks(TENANT, limit=2, after=page2[-1].task_id)
    assert [r.task_id for r in page3] == newest_first[4:] and not more3
    everything, more = await store.list_tasks(TENANT, limit=100)
    assert [r.task_id for r in everything] == newest_first and not more
    asc, _ = await store.list_tasks(TENANT, limit=100, order="asc")
    assert [r.task_id for r in asc] == list(reversed(newest_first))
    asc2, _ = await store.list_tasks(TENANT, limit=2, order="asc", after=asc[1].task_id)
    assert [r.task_id for r in asc2] == [r.task_id for r in asc[2:4]]
    running, more = await store.list_tasks(TENANT, limit=10, status="RUNNING")
    assert [r.task_id for r in running] == [made[1][1]] and not more
    # A hidden task still works as a cursor; an unknown or foreign one yields nothing.
    after_hidden, _ = await store.list_tasks(TENANT, limit=10, after=hidden_tid)
    assert [r.task_id for r in after_hidden] == [made[1][1], made[0][1]]
    assert await store.list_tasks(TENANT, limit=10, after="task-nope") == ([], False)
    other_tid = (await store.list_tasks(OTHER, limit=10))[0][0].task_id
    assert await store.list_tasks(TENANT, limit=10, after=other_tid) == ([], False)


async def test_get_by_task_id_is_per_tenant_and_hides_deleted(store: Store) -> None:
    rec, tid = await create(store)
    got = await store.get_by_task_id(TENANT, tid)
    assert got is not None and got.rid == rec.rid and got.tenant_id == TENANT
    assert await store.get_by_task_id(OTHER, tid) is None
    assert not await store.hide_task(OTHER, tid)
    assert await store.hide_task(TENANT, tid)
    assert not await store.hide_task(TENANT, tid)
    assert await store.get_by_task_id(TENANT, tid) is None
    byrid = await store.get_by_rid(rec.rid)
    assert byrid is not None and byrid.deleted


async def test_read_task_is_a_request_token_then_the_tenants_task(store: Store) -> None:
    """A poll in one operation: the same bucket as take_request, the same visibility as
    get_by_task_id, and a refusal reads nothing and takes nothing."""
    rec, tid = await create(store)
    limits = Limits(requests_per_minute=3)
    adm, got = await store.read_task(TENANT, limits, tid, T0)
    assert adm.ok and adm.rate == RateInfo(3, 2, 20.0)
    assert got is not None and got.rid == rec.rid and got.task_id == tid and got.status == "PENDING"
    assert got == await store.get_by_task_id(TENANT, tid)
    adm, got = await store.read_task(TENANT, limits, "task-nope", T0)  # unknown: a token all the same
    assert adm.ok and adm.rate == RateInfo(3, 1, 40.0) and got is None
    adm, got = await store.read_task(OTHER, limits, tid, T0)  # another tenant's bucket, not its task
    assert adm.ok and adm.rate == RateInfo(3, 2, 20.0) and got is None
    assert (await store.take_request(TENANT, limits, T0)).rate == RateInfo(3, 0, 60.0)
    refused, got = await store.read_task(TENANT, limits, tid, T0 + 5)
    assert not refused.ok and refused.limit == "requests_per_minute" and got is None
    assert refused.retry_after == bucket_retry_after(0.25, 3) == 15.0 and refused.rate == bucket_info(0.25, 3)
    adm, got = await store.read_task(TENANT, limits, tid, T0 + 20)  # the refusal spent nothing
    assert adm.ok and adm.rate == bucket_info(0.0, 3) and got is not None
    unlimited, got = await store.read_task(TENANT, Limits(), tid, T0 + 20)
    assert unlimited.ok and unlimited.rate is None and got is not None and got.rid == rec.rid
    assert await store.hide_task(TENANT, tid)
    assert (await store.read_task(TENANT, Limits(), tid, T0 + 20))[1] is None


async def test_record_round_trip(store: Store) -> None:
    rec = TaskRecord(
        rid=new_rid(), tenant_id=TENANT, key_index=2, hook=HOOK, task_type="gen2", credits=15,
        created_at=T0 + 0.123456789, updated_at=T0 + 0.5, next_poll_at=T0 + 5.25,
        meta={"size": "1280x768", "nested": {"a": [1, 2.5, None, "x"]}, "big": 2**53 + 1, "prompt": TRICKY},
    )  # fmt: skip
    adm = await store.admit_create(TENANT, Limits(), Charge(15, day_key(T0), month_key(T0)), rec, T0)
    assert adm.ok
    got = await store.get_by_rid(rec.rid)
    assert got == rec  # every field survives, floats exactly, meta included
    assert await store.get_by_rid("req_missing") is None
    task = task_obj("t-tricky", "PENDING", promptText=TRICKY, ratio=0.1 + 0.2, seed=4294967295)
    res = await store.apply_update(rec.rid, TENANT, task, T0 + 1, refund_failed=True)
    assert res.record is not None and res.record.task == task
    assert (await store.get_by_task_id(TENANT, "t-tricky")).task == task  # type: ignore[union-attr]


async def test_secret_first_writer_wins(store: Store) -> None:
    results = await asyncio.gather(*(store.secret("hook-signing", f"candidate-{i}") for i in range(10)))
    assert len(set(results)) == 1 and results[0].startswith("candidate-")
    assert await store.secret("hook-signing", "late") == results[0]
    assert await store.secret("other", "mine") == "mine"


async def test_gauges_active_by_tenant_and_webhook_pending(store: Store) -> None:
    assert await nonzero_active(store) == {} and await store.webhook_pending() == 0
    a, tid = await create(store, hook=HOOK)
    await create(store)
    await create(store, tenant=OTHER)
    assert await nonzero_active(store) == {TENANT: 2, OTHER: 1}
    await store.apply_update(a.rid, TENANT, task_obj(tid, "CANCELLED"), T0 + 1, refund_failed=True)
    assert await nonzero_active(store) == {TENANT: 1, OTHER: 1}
    assert await store.webhook_pending() == 1
    await store.ping()


# --- races --------------------------------------------------------------------------------

RACE_LIMITS = {
    "max_active_tasks": Limits(max_active_tasks=7),
    "tasks_per_day": Limits(tasks_per_day=7),
    "credits_per_day": Limits(credits_per_day=70),
}


@pytest.mark.parametrize("limit", list(RACE_LIMITS))
async def test_concurrent_creates_admit_exactly_the_limit(store: Store, limit: str) -> None:
    limits = RACE_LIMITS[limit]
    results = await asyncio.gather(*(admit(store, limits) for _ in range(50)))
    admitted = [adm for adm, _ in results if adm.ok]
    assert len(admitted) == 7
    assert {adm.limit for adm, _ in results if not adm.ok} == {limit}
    assert await store.usage(TENANT, T0) == Usage(7, 7, 70, 70, 7)


async def _race_child(spec: dict[str, str], limits: dict[str, int], n: int, start_at: float) -> int:
    """One process's half of the cross-process race: n creates at once, from start_at."""
    store = StoreSpec(**spec).make()
    await store.open()
    try:
        await asyncio.sleep(max(0.0, start_at - time.time() - 0.05))
        while time.time() < start_at:  # spin the last moment: both processes fire together
            pass
        results = await asyncio.gather(*(_jittered_admit(store, Limits(**limits), i) for i in range(n)))
        return sum(results)
    finally:
        await store.close()


async def _jittered_admit(store: Store, limits: Limits, i: int) -> bool:
    """Spread a process's creates over ~20 ms so the two processes interleave (a SQLite
    writer would otherwise finish its whole burst while the other waits on the lock)."""
    await asyncio.sleep((i % 10) * 0.002)
    return (await admit(store, limits))[0].ok


def race_child_main(argv: list[str]) -> None:
    spec, limits, n, start_at = json.loads(argv[0])
    print(json.dumps(asyncio.run(_race_child(spec, limits, n, start_at))))


CHILD_CODE = (
    "import sys; sys.path.insert(0, sys.argv[1]); import test_store_contract as t; t.race_child_main(sys.argv[2:])"
)


@pytest.mark.parametrize("limit", list(RACE_LIMITS))
async def test_creates_from_two_processes_admit_exactly_the_limit(
    store: Store, store_spec: StoreSpec, limit: str
) -> None:
    limits = RACE_LIMITS[limit]
    payload = json.dumps(
        [
            {"kind": store_spec.kind, "target": store_spec.target, "prefix": store_spec.prefix},
            {k: v for k, v in vars(limits).items() if v is not None},
            25,
            time.time() + 2.0,  # both children open their store first, then fire together
        ]
    )
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CHILD_CODE,
            str(Path(__file__).parent),
            payload,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(2)
    ]
    outputs = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), timeout=120)
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err.decode()
    counts = [int(out) for out, _ in outputs]
    assert sum(counts) == 7, counts
    assert await store.usage(TENANT, T0) == Usage(7, 7, 70, 70, 7)


# --- Redis only ---------------------------------------------------------------------------


async def test_redis_store_fails_fast_when_redis_is_down() -> None:
    from gateway.store.redis import RedisStore

    dead = RedisStore("redis://127.0.0.1:1/0", prefix="gwtest:dead:")
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):  # the one outage error both stores raise (503)
        await dead.ping()
    assert time.monotonic() - started < 3.0
    await dead.close()


async def test_redis_store_expires_finished_tasks_and_prunes_listings(redis_url: str) -> None:
    from gateway.store.redis import RedisStore

    prefix = f"gwtest:{uuid.uuid4().hex[:8]}:"
    store = RedisStore(redis_url, prefix=prefix, terminal_ttl=2.0)
    await store.open()
    try:
        rec, tid = await create(store)
        live, live_tid = await create(store, now=T0 + 1)
        await store.apply_update(rec.rid, TENANT, task_obj(tid, "SUCCEEDED"), T0 + 2, refund_failed=True)
        assert len((await store.list_tasks(TENANT, limit=10))[0]) == 2
        # Redis TTLs run on Redis's clock, not the caller's: wait for it
        deadline = time.monotonic() + 15
        while await store.get_by_rid(rec.rid) is not None:
            assert time.monotonic() < deadline, "the finished task never expired"
            await asyncio.sleep(0.1)
        assert await store.get_by_task_id(TENANT, tid) is None
        assert [r.task_id for r in (await store.list_tasks(TENANT, limit=10))[0]] == [live_tid]
        assert (await store.get_by_rid(live.rid)) is not None
    finally:
        await store.close()
        await _delete_prefix(redis_url, prefix)


async def test_redis_store_takes_its_prefix_from_the_url(redis_url: str) -> None:
    from gateway.store.redis import RedisStore

    prefix = f"gwtest:{uuid.uuid4().hex[:8]}:"
    sep = "&" if "?" in redis_url else "?"
    store = RedisStore(f"{redis_url}{sep}prefix={prefix}")
    await store.open()
    try:
        assert store.prefix == prefix
        assert await store.secret("s", "v") == "v"
        import redis.asyncio as aioredis

        raw = aioredis.Redis.from_url(redis_url)
        assert await raw.get(f"{prefix}secret:s") == b"v"
        await raw.aclose()
    finally:
        await store.close()
        await _delete_prefix(redis_url, prefix)


async def test_assets_are_kept_until_they_expire(store: Store) -> None:
    data = bytes(range(256)) * 40  # binary, with NULs
    await store.put_asset("a" * 32 + ".png", "image/png", data, expires_at=T0 + 10, now=T0)
    assert await store.get_asset("a" * 32 + ".png", T0 + 5) == ("image/png", data)
    assert await store.get_asset("b" * 32 + ".png", T0 + 5) is None
    if type(store).__name__ == "SQLiteStore":  # Redis expires by its own clock; SQLite by the caller's
        assert await store.get_asset("a" * 32 + ".png", T0 + 11) is None


async def test_a_deleted_asset_is_gone_and_deleting_an_unknown_one_is_harmless(store: Store) -> None:
    await store.put_asset("c" * 32 + ".jpg", "image/jpeg", b"\xff\xd8\xff" + bytes(10), expires_at=T0 + 60, now=T0)
    await store.put_asset("d" * 32 + ".jpg", "image/jpeg", b"\xff\xd8\xff", expires_at=T0 + 60, now=T0)
    await store.delete_asset("c" * 32 + ".jpg")
    await store.delete_asset("e" * 32 + ".jpg")
    assert await store.get_asset("c" * 32 + ".jpg", T0 + 1) is None
    assert await store.get_asset("d" * 32 + ".jpg", T0 + 1) == ("image/jpeg", b"\xff\xd8\xff")


# --- the directory: tenants, keys, audit ------------------------------------------------


AUDIT_SEQ = itertools.count()


def audit_entry(action: str, *, tenant: str | None = TENANT, key_id: str | None = None, at: float = T0) -> AuditEntry:
    return AuditEntry(
        id=f"aud_{int(at * 1000):012x}{next(AUDIT_SEQ):08x}",  # same time: in the order made
        time=at,
        actor_type="admin_key",
        actor_id="adm_0123456789ab",
        action=action,
        tenant=tenant,
        key_id=key_id,
        changes={"note": TRICKY},
        request_id="req_1",
        ip="10.0.0.1",
    )


def tenant_record(tenant_id: str = TENANT, **kw: Any) -> TenantRecord:
    return TenantRecord(id=tenant_id, **{"created_at": T0, "updated_at": T0, **kw})


def key_record(key_id: str | None = None, *, tenant: str = TENANT, at: float = T0, **kw: Any) -> KeyRecord:
    fields = {"name": "billing-svc", "prefix": "sk-gw-AbCd", "secret_hash": "sha256:" + "a" * 64, **kw}
    return KeyRecord(id=key_id or f"key_{uuid.uuid4().hex}", tenant_id=tenant, created_at=at, **fields)


async def audit_actions(store: Store) -> list[str]:
    page, _ = await store.list_audit(limit=1000)
    return [e.action for e in page]


async def test_tenant_and_key_records_round_trip(store: Store) -> None:
    full = tenant_record(
        "search-team",
        name=TRICKY,
        enabled=False,
        limits=Limits(requests_per_minute=600, max_active_tasks=0, credits_per_month=2**40),
        policy={"force": {"watermark": False}, "defaults": {"ratio": "1280:768"}, "hook_hosts": []},
        webhook_secret="whsec_new",
        previous_webhook_secret="whsec_old",
        previous_webhook_secret_expires_at=T0 + 0.123456789,
        created_at=T0 + 0.1,
        updated_at=T0 + 0.2,
    )
    bare = tenant_record("bare")  # every limit None (unlimited), empty policy and secrets
    assert await store.create_tenant(full, audit_entry("tenant.create", tenant=full.id))
    assert await store.create_tenant(bare, audit_entry("tenant.create", tenant=bare.id))
    assert await store.get_tenant("search-team") == full
    assert await store.get_tenant("bare") == bare and bare.limits == Limits()
    assert await store.get_tenant("nobody") is None

    key = key_record(
        "key_full",
        tenant="search-team",
        previous_hash="sha256:" + "b" * 64,
        previous_expires_at=T0 + 86400.5,
        expires_at=T0 + 3600.25,
        last_used_at=T0 + 1.5,
        revoked_at=T0 + 2.75,
    )
    plain = key_record("key_plain", tenant="bare")  # every optional time None
    await store.create_key(key, audit_entry("key.create", tenant="search-team", key_id=key.id))
    await store.create_key(plain, audit_entry("key.create", tenant="bare", key_id=plain.id))
    assert await store.get_key("key_full") == key
    assert await store.get_key("key_plain") == plain
    assert await store.get_key("key_missing") is None

    entries, more = await store.list_audit(limit=10)
    assert not more and [e.action for e in entries] == ["key.create", "key.create", "tenant.create", "tenant.create"]
    first = audit_entry("tenant.create", tenant=full.id)
    await store.append_audit(first)
    got, _ = await store.list_audit(limit=1, action="tenant.create", tenant=full.id)
    assert got[0].changes == {"note": TRICKY} and got[0].request_id == "req_1" and got[0].ip == "10.0.0.1"


async def test_create_tenant_twice_writes_nothing_the_second_time(store: Store) -> None:
    assert await store.create_tenant(tenant_record(name="first"), audit_entry("tenant.create"))
    version = await store.directory_version()
    assert not await store.create_tenant(tenant_record(name="second"), audit_entry("tenant.create"))
    assert await store.directory_version() == version
    assert (await store.get_tenant(TENANT)).name == "first"  # type: ignore[union-attr]
    assert await audit_actions(store) == ["tenant.create"]


async def test_update_tenant_merges_limits_and_replaces_policy(store: Store) -> None:
    limits = Limits(requests_per_minute=60, tasks_per_day=100, credits_per_day=500)
    policy = {"force": {"a": 1}, "defaults": {"b": 2}, "hook_hosts": ["hooks.acme.example"]}
    assert await store.create_tenant(tenant_record(limits=limits, policy=policy), audit_entry("tenant.create"))
    changes = {
        "limits": {"requests_per_minute": 120, "tasks_per_day": None, "max_active_tasks": 3},
        "policy": {"hook_hosts": []},
        "name": "Acme",
        "enabled": False,
    }
    updated = await store.update_tenant(TENANT, changes, T0 + 10, audit_entry("tenant.update", at=T0 + 10))
    expected = tenant_record(
        name="Acme",
        enabled=False,
        limits=Limits(requests_per_minute=120, max_active_tasks=3, credits_per_day=500),
        policy={"hook_hosts": []},
        updated_at=T0 + 10,
    )
    assert updated == expected and await store.get_tenant(TENANT) == expected
    rotated = await store.update_tenant(
        TENANT,
        {"webhook_secret": "new", "previous_webhook_secret": "old", "previous_webhook_secret_expires_at": T0 + 99.5},
        T0 + 11,
        audit_entry("tenant.webhook_secret.rotate", at=T0 + 11),
    )
    assert rotated is not None and rotated.limits == expected.limits and rotated.policy == {"hook_hosts": []}
    assert (rotated.webhook_secret, rotated.previous_webhook_secret) == ("new", "old")
    assert rotated.previous_webhook_secret_expires_at == T0 + 99.5 and rotated.updated_at == T0 + 11
    cleared = await store.update_tenant(
        TENANT, {"previous_webhook_secret_expires_at": None}, T0 + 12, audit_entry("tenant.update", at=T0 + 12)
    )
    assert cleared is not None and cleared.previous_webhook_secret_expires_at is None


async def test_update_of_an_unknown_tenant_or_key_writes_nothing(store: Store) -> None:
    version = await store.directory_version()
    assert await store.update_tenant("nobody", {"name": "x"}, T0, audit_entry("tenant.update")) is None
    assert await store.update_key("key_nobody", {"name": "x"}, audit_entry("key.update")) is None
    assert await store.directory_version() == version
    assert await audit_actions(store) == []
    assert await store.get_tenant("nobody") is None and await store.get_key("key_nobody") is None


async def test_update_key_sets_fields_and_rotation_fields(store: Store) -> None:
    key = key_record("key_rot", expires_at=T0 + 100)
    await store.create_key(key, audit_entry("key.create", key_id=key.id))
    renamed = await store.update_key(key.id, {"name": "renamed", "expires_at": None}, audit_entry("key.update"))
    assert renamed == key_record("key_rot", name="renamed") and await store.get_key(key.id) == renamed
    rotation = {
        "secret_hash": "sha256:" + "c" * 64,
        "prefix": "sk-gw-NeWw",
        "previous_hash": key.secret_hash,
        "previous_expires_at": T0 + 86400,
    }
    rotated = await store.update_key(key.id, rotation, audit_entry("key.rotate", key_id=key.id))
    assert rotated is not None and rotated.id == key.id and rotated.name == "renamed"
    assert (rotated.secret_hash, rotated.prefix, rotated.previous_hash) == (
        "sha256:" + "c" * 64,
        "sk-gw-NeWw",
        key.secret_hash,
    )
    assert rotated.previous_expires_at == T0 + 86400.0
    revoked = await store.update_key(key.id, {"revoked_at": T0 + 5.5}, audit_entry("key.revoke", key_id=key.id))
    assert revoked is not None and revoked.revoked_at == T0 + 5.5 and revoked.secret_hash == rotated.secret_hash
    assert await audit_actions(store) == ["key.revoke", "key.rotate", "key.update", "key.create"]


async def test_every_change_bumps_the_version_once_and_touch_keys_never(store: Store) -> None:
    assert await store.directory_version() == 0
    assert await store.create_tenant(tenant_record(), audit_entry("tenant.create"))
    assert await store.directory_version() == 1
    await store.update_tenant(TENANT, {"enabled": False}, T0, audit_entry("tenant.update"))
    assert await store.directory_version() == 2
    key = key_record()
    await store.create_key(key, audit_entry("key.create"))
    assert await store.directory_version() == 3
    await store.update_key(key.id, {"name": "n"}, audit_entry("key.update"))
    assert await store.directory_version() == 4
    await store.touch_keys({key.id: T0 + 1})
    await store.append_audit(audit_entry("config.reload", tenant=None))
    assert await store.directory_version() == 4
    assert (await store.load_directory()).version == 4


async def test_touch_keys_never_lowers_last_used(store: Store) -> None:
    a, b = key_record("key_a"), key_record("key_b", last_used_at=T0 + 50)
    for k in (a, b):
        await store.create_key(k, audit_entry("key.create", key_id=k.id))
    await store.touch_keys({"key_a": T0 + 10, "key_b": T0 + 20, "key_unknown": T0})
    assert (await store.get_key("key_a")).last_used_at == T0 + 10  # type: ignore[union-attr]
    assert (await store.get_key("key_b")).last_used_at == T0 + 50  # type: ignore[union-attr]
    await store.touch_keys({"key_a": T0 + 5})
    assert (await store.get_key("key_a")).last_used_at == T0 + 10  # type: ignore[union-attr]
    await store.touch_keys({"key_a": T0 + 10.25, "key_b": T0 + 60})
    assert (await store.get_key("key_a")).last_used_at == T0 + 10.25  # type: ignore[union-attr]
    assert (await store.get_key("key_b")).last_used_at == T0 + 60  # type: ignore[union-attr]
    assert await store.get_key("key_unknown") is None  # a touch creates nothing


async def test_config_keys_last_use_is_kept_apart_and_never_lowered(store: Store) -> None:
    """A config key has no record, but its id is stable: touch_keys keeps its time apart."""
    version = await store.directory_version()
    assert await store.config_key_uses(["key_cfg_aaaaaaaaaaaa"]) == {}
    await store.touch_keys({"key_cfg_aaaaaaaaaaaa": T0 + 10.25, "key_cfg_bbbbbbbbbbbb": T0 + 20})
    await store.touch_keys({"key_cfg_aaaaaaaaaaaa": T0 + 5})
    uses = await store.config_key_uses(["key_cfg_aaaaaaaaaaaa", "key_cfg_bbbbbbbbbbbb", "key_cfg_cccccccccccc"])
    assert uses == {"key_cfg_aaaaaaaaaaaa": T0 + 10.25, "key_cfg_bbbbbbbbbbbb": T0 + 20}
    await store.touch_keys({"key_cfg_bbbbbbbbbbbb": T0 + 30})
    assert await store.config_key_uses(["key_cfg_bbbbbbbbbbbb"]) == {"key_cfg_bbbbbbbbbbbb": T0 + 30}
    assert await store.get_key("key_cfg_aaaaaaaaaaaa") is None and await store.directory_version() == version


async def test_load_directory_and_list_keys_newest_first(store: Store) -> None:
    empty = await store.load_directory()
    assert empty == DirectorySnapshot(0, [], [])
    tenants = [tenant_record("t1", limits=Limits(tasks_per_day=5)), tenant_record("t2")]
    for t in tenants:
        assert await store.create_tenant(t, audit_entry("tenant.create", tenant=t.id))
    keys = [key_record(f"key_{i}", tenant="t1", at=T0 + i) for i in range(3)] + [key_record("key_x", tenant="t2")]
    for k in keys:
        await store.create_key(k, audit_entry("key.create", tenant=k.tenant_id, key_id=k.id))
    await store.touch_keys({"key_1": T0 + 30})
    keys[1].last_used_at = T0 + 30
    snap = await store.load_directory()
    assert snap.version == 6
    assert sorted(snap.tenants, key=lambda t: t.id) == tenants
    assert sorted(snap.keys, key=lambda k: k.id) == sorted(keys, key=lambda k: k.id)
    assert [k.id for k in await store.list_keys("t1")] == ["key_2", "key_1", "key_0"]
    assert await store.list_keys("t2") == [keys[3]]
    assert await store.list_keys("nobody") == []


async def test_list_audit_pages_newest_first_with_filters(store: Store) -> None:
    entries = [
        audit_entry(action, tenant=tenant, at=T0 + i)
        for i, (action, tenant) in enumerate(
            [("tenant.create", "a"), ("key.create", "a"), ("tenant.create", "b"), ("config.reload", None)] * 3
        )
    ]
    same_time = [audit_entry("key.revoke", tenant="a", at=T0 + 100) for _ in range(3)]  # ties: by id
    for e in entries + same_time:
        await store.append_audit(e)
    newest_first = sorted(entries + same_time, key=lambda e: (e.time, e.id), reverse=True)

    async def walk(**filters: Any) -> list[str]:
        ids: list[str] = []
        after = None
        while True:
            page, more = await store.list_audit(limit=2, after=after, **filters)
            ids += [e.id for e in page]
            if not more:
                return ids
            assert len(page) == 2
            after = page[-1].id

    assert await walk() == [e.id for e in newest_first]
    assert await walk(tenant="a") == [e.id for e in newest_first if e.tenant == "a"]
    assert await walk(action="tenant.create") == [e.id for e in newest_first if e.action == "tenant.create"]
    assert await walk(tenant="b", action="tenant.create") == [
        e.id for e in newest_first if e.tenant == "b" and e.action == "tenant.create"
    ]
    assert await walk(tenant="nobody") == []
    assert await store.list_audit(limit=5, after="aud_unknown") == ([], False)
    page, more = await store.list_audit(limit=len(newest_first))
    assert len(page) == len(newest_first) and not more
    assert page[0] == newest_first[0]  # every field round-trips


async def test_prune_audit_deletes_older_entries(store: Store) -> None:
    for i in range(6):
        await store.append_audit(audit_entry("key.update", tenant="a" if i % 2 else "b", at=T0 + i))
    assert await store.prune_audit(T0 + 3) == 3
    page, _ = await store.list_audit(limit=100)
    assert [e.time for e in page] == [T0 + 5, T0 + 4, T0 + 3]
    assert [e.time for e in (await store.list_audit(limit=100, tenant="b"))[0]] == [T0 + 4]
    assert [e.time for e in (await store.list_audit(limit=100, action="key.update"))[0]] == [T0 + 5, T0 + 4, T0 + 3]
    assert await store.prune_audit(T0 + 3) == 0


async def test_concurrent_creates_of_one_tenant_have_one_winner(store: Store) -> None:
    results = await asyncio.gather(
        *(store.create_tenant(tenant_record(name=f"n{i}"), audit_entry("tenant.create")) for i in range(20))
    )
    assert results.count(True) == 1
    assert await audit_actions(store) == ["tenant.create"]
    assert await store.directory_version() == 1


async def test_concurrent_tenant_updates_each_bump_the_version(store: Store) -> None:
    assert await store.create_tenant(tenant_record(), audit_entry("tenant.create"))
    before = await store.directory_version()
    n = 20
    results = await asyncio.gather(
        *(
            store.update_tenant(TENANT, {"limits": {f"{ALL_LIMITS[i % 6]}": i}}, T0 + i, audit_entry("tenant.update"))
            for i in range(n)
        )
    )
    assert all(r is not None for r in results)
    assert await store.directory_version() == before + n
    final = await store.get_tenant(TENANT)
    assert final is not None
    for name in ALL_LIMITS:  # every merge kept the others' limits: the last write of each name won
        assert getattr(final.limits, name) == max(i for i in range(n) if ALL_LIMITS[i % 6] == name)
    assert len(await audit_actions(store)) == n + 1


async def test_sqlite_file_from_before_the_directory_gains_its_tables(tmp_path: Path) -> None:
    """A file written by a gateway without the directory (no tenants, api_keys, audit or
    directory tables) opens and works: CREATE TABLE IF NOT EXISTS adds them at version 0."""
    import sqlite3

    from gateway.store.sqlite import SQLiteStore

    path = str(tmp_path / "old.db")
    old = SQLiteStore(path)
    await old.open()
    await old.secret("kept", "value")
    await old.close()
    db = sqlite3.connect(path)
    for table in ("tenants", "api_keys", "audit", "directory"):
        db.execute(f"DROP TABLE {table}")
    db.commit()
    db.close()
    store = SQLiteStore(path)
    await store.open()
    try:
        assert await store.secret("kept", "other") == "value"
        assert await store.directory_version() == 0
        assert await store.create_tenant(tenant_record(), audit_entry("tenant.create"))
        assert await store.load_directory() == DirectorySnapshot(1, [tenant_record()], [])
    finally:
        await store.close()


def new_hash(n: int) -> str:
    return f"sha256:{n:064x}"


async def test_rotate_key_keeps_the_old_hash_for_the_grace_period_or_drops_it(store: Store) -> None:
    key = key_record("key_rot", expires_at=T0 + 500)
    await store.create_key(key, audit_entry("key.create", key_id=key.id))
    graced = await store.rotate_key(key.id, new_hash(1), "sk-gw-One1", T0 + 60, T0, audit_entry("key.rotate"))
    assert graced == key_record(
        "key_rot",
        expires_at=T0 + 500,
        secret_hash=new_hash(1),
        prefix="sk-gw-One1",
        previous_hash=key.secret_hash,
        previous_expires_at=T0 + 60,
    )
    assert await store.get_key(key.id) == graced
    for grace_until in (None, T0 + 1):  # none, or one already over at `now`
        dropped = await store.rotate_key(
            key.id, new_hash(2), "sk-gw-Two2", grace_until, T0 + 1, audit_entry("key.rotate")
        )
        assert dropped == key_record(
            "key_rot",
            expires_at=T0 + 500,
            secret_hash=new_hash(2),
            prefix="sk-gw-Two2",
            earlier_hashes={key.secret_hash: T0 + 60},  # the first rotation's grace still holds
        )
        assert await store.get_key(key.id) == dropped
    assert await audit_actions(store) == ["key.rotate"] * 3 + ["key.create"]
    assert await store.directory_version() == 4


async def test_rotate_webhook_secret_keeps_the_old_secret_for_the_grace_period_or_drops_it(store: Store) -> None:
    tenant = tenant_record(name="n", webhook_secret="whsec_old")
    assert await store.create_tenant(tenant, audit_entry("tenant.create"))
    graced = await store.rotate_webhook_secret(TENANT, "whsec_new", T0 + 60, T0 + 5, audit_entry("tenant.rotate"))
    assert graced == tenant_record(
        name="n",
        webhook_secret="whsec_new",
        previous_webhook_secret="whsec_old",
        previous_webhook_secret_expires_at=T0 + 60,
        updated_at=T0 + 5,
    )
    assert await store.get_tenant(TENANT) == graced
    dropped = await store.rotate_webhook_secret(TENANT, "whsec_3rd", None, T0 + 6, audit_entry("tenant.rotate"))
    assert dropped == tenant_record(
        name="n", webhook_secret="whsec_3rd", updated_at=T0 + 6, earlier_webhook_secrets={"whsec_old": T0 + 60}
    )
    assert await store.get_tenant(TENANT) == dropped
    assert await store.directory_version() == 3
    gone = await store.rotate_webhook_secret(TENANT, "whsec_4th", None, T0 + 60, audit_entry("tenant.rotate"))
    assert gone == tenant_record(name="n", webhook_secret="whsec_4th", updated_at=T0 + 60)  # its grace over


async def test_overlapping_rotations_each_keep_the_grace_they_gave(store: Store) -> None:
    """A rotation's grace holds for the secret it replaced, whatever later rotations give
    theirs: A -> B (A until +100.5), B -> C (B until +20), C -> D (no grace) leaves A
    until +100.5 and B until +20; a rotation after +20 drops B, after +100.5 drops A."""
    key = key_record("key_overlap")
    await store.create_key(key, audit_entry("key.create", key_id=key.id))
    a, b, c, d, e = key.secret_hash, new_hash(1), new_hash(2), new_hash(3), new_hash(4)
    await store.rotate_key(key.id, b, "sk-gw-0001", T0 + 100.5, T0, audit_entry("key.rotate"))
    second = await store.rotate_key(key.id, c, "sk-gw-0002", T0 + 20, T0 + 10, audit_entry("key.rotate"))
    assert second is not None and (second.previous_hash, second.previous_expires_at) == (b, T0 + 20)
    assert second.earlier_hashes == {a: T0 + 100.5}
    third = await store.rotate_key(key.id, d, "sk-gw-0003", None, T0 + 11, audit_entry("key.rotate"))
    assert third is not None and third.secret_hash == d and third.previous_hash == ""
    assert third.earlier_hashes == {a: T0 + 100.5, b: T0 + 20.0}
    assert await store.get_key(key.id) == third
    assert [k.earlier_hashes for k in (await store.load_directory()).keys if k.id == key.id] == [third.earlier_hashes]
    later = await store.rotate_key(key.id, e, "sk-gw-0004", None, T0 + 50, audit_entry("key.rotate"))
    assert later is not None and later.earlier_hashes == {a: T0 + 100.5}
    last = await store.rotate_key(key.id, new_hash(5), "sk-gw-0005", T0 + 200, T0 + 101, audit_entry("key.rotate"))
    assert last is not None and last.earlier_hashes == {} and last.previous_hash == e


async def test_rotating_an_unknown_or_revoked_key_or_unknown_tenant_writes_nothing(store: Store) -> None:
    key = key_record("key_gone", revoked_at=T0 + 1)
    await store.create_key(key, audit_entry("key.create", key_id=key.id))
    version = await store.directory_version()
    assert (
        await store.rotate_key("key_nobody", new_hash(1), "sk-gw-One1", T0 + 60, T0, audit_entry("key.rotate")) is None
    )
    assert await store.rotate_webhook_secret("nobody", "whsec_x", T0 + 60, T0, audit_entry("tenant.rotate")) is None
    refused = await store.rotate_key(key.id, new_hash(1), "sk-gw-One1", T0 + 60, T0 + 2, audit_entry("key.rotate"))
    assert refused == key and await store.get_key(key.id) == key  # returned as stored: revoked_at set
    assert await store.directory_version() == version
    assert await audit_actions(store) == ["key.create"]
    assert await store.get_key("key_nobody") is None and await store.get_tenant("nobody") is None


async def test_concurrent_rotations_of_one_key_chain(store: Store) -> None:
    """Each rotation moves the hash current at that moment to previous_hash: 20 at once
    replace each hash exactly once (a read-then-write would let two replace the same one,
    and leave a caller's new secret neither current nor previous)."""
    key = key_record("key_race")
    await store.create_key(key, audit_entry("key.create", key_id=key.id))
    before, n = await store.directory_version(), 20
    results = await asyncio.gather(
        *(
            store.rotate_key(key.id, new_hash(i), f"sk-gw-{i:04d}", T0 + 60, T0, audit_entry("key.rotate"))
            for i in range(n)
        )
    )
    assert all(r is not None and r.secret_hash == new_hash(i) for i, r in enumerate(results))
    assert await store.directory_version() == before + n
    assert len(await audit_actions(store)) == n + 1
    final = await store.get_key(key.id)
    assert final is not None and final.secret_hash in {new_hash(i) for i in range(n)}
    replaced = [r.previous_hash for r in results if r is not None]
    assert sorted(replaced) == sorted({key.secret_hash, *(new_hash(i) for i in range(n))} - {final.secret_hash})
    last = next(r for r in results if r is not None and r.secret_hash == final.secret_hash)
    assert final == last  # the previous hash is the one current just before the last rotation
    # every replaced hash keeps its grace: the last one replaced as previous, the rest earlier
    assert sorted([final.previous_hash, *final.earlier_hashes]) == sorted(replaced)
    assert set(final.earlier_hashes.values()) == {T0 + 60}


# --- webhook deliveries an operator can see and redeliver ----------------------------------


async def three_events(store: Store, *, tenant: str = TENANT, at: float = T0) -> tuple[TaskRecord, str, list[str]]:
    """A hooked task that went THROTTLED, RUNNING, SUCCEEDED: three events, in that order."""
    rec, tid = await create(store, hook=HOOK, tenant=tenant, now=at)
    events = []
    for i, status in enumerate(("THROTTLED", "RUNNING", "SUCCEEDED"), start=1):
        task = task_obj(tid, status, f"2026-01-15T12:00:{i:02d}Z")
        res = await store.apply_update(rec.rid, tenant, task, at + i, refund_failed=True)
        assert res.event_id is not None
        events.append(res.event_id)
    return rec, tid, events


async def kill(store: Store, event_id: str, now: float, attempts: int = 3, error: str = "http 500") -> None:
    """Claim `event_id` (its task's head) and give it up, as the dispatcher does."""
    claimed = await store.claim_webhooks(now, 1000, lease=20)
    assert event_id in [e.event_id for e in claimed]
    await store.finish_webhook(event_id, delivered=False, attempts=attempts, next_at=None, now=now, error=error)


async def deliver_all(store: Store, now: float) -> list[str]:
    """Deliver everything claimable, round after round; the ids in delivery order."""
    order: list[str] = []
    while batch := await store.claim_webhooks(now, 1000, lease=20):
        for e in batch:
            await store.finish_webhook(e.event_id, delivered=True, attempts=e.attempts + 1, next_at=None, now=now)
            order.append(e.event_id)
    return order


async def test_a_dead_event_holds_its_task_back_and_a_redelivery_keeps_its_place(store: Store) -> None:
    rec, tid, (e1, e2, e3) = await three_events(store)
    other, _, others = await three_events(store, at=T0 + 1)
    now = T0 + 60
    claimed = await store.claim_webhooks(now, 10, lease=20)
    assert sorted(e.event_id for e in claimed) == sorted([e1, others[0]])
    await store.finish_webhook(e1, delivered=False, attempts=1, next_at=now + 5, now=now, error="ConnectError")
    [retrying] = (await store.list_webhooks(limit=10, state="pending", tenant=TENANT))[0][-1:]
    assert (retrying.event_id, retrying.attempts, retrying.next_at, retrying.last_error) == (
        e1,
        1,
        now + 5,
        "ConnectError",
    )
    await store.finish_webhook(others[0], delivered=True, attempts=1, next_at=None, now=now)
    await kill(store, e1, now + 5, attempts=2, error="x" * 500)
    assert await store.webhook_pending() == 4  # e2, e3 and the other task's two

    # The other task is not held back; this one's later events wait behind the dead one.
    assert await deliver_all(store, now + 10**5) == others[1:]
    dead, more = await store.list_webhooks(limit=10, state="dead")
    assert not more and [d.event_id for d in dead] == [e1]
    d = dead[0]
    assert (d.tenant_id, d.rid, d.task_id, d.state, d.attempts, d.next_at) == (TENANT, rec.rid, tid, "dead", 2, None)
    assert d.last_error == "x" * LAST_ERROR_MAX and d.created_at == T0 + 1
    assert [p.event_id for p in (await store.list_webhooks(limit=10, state="pending"))[0]] == [e3, e2]

    later = now + 10**5 + 1
    redelivered = await store.redeliver_webhook(e1, later, audit_entry("webhook.redeliver", tenant=None, at=later))
    assert redelivered is not None
    entry, done = redelivered
    assert done and (entry.event_id, entry.state, entry.attempts, entry.next_at, entry.last_error) == (
        e1, "pending", 0, later, None
    )  # fmt: skip
    assert entry.seq < min((await store.list_webhooks(limit=10, state="pending"))[0][0].seq, 99)
    [audit], _ = await store.list_audit(limit=10, action="webhook.redeliver")
    assert audit.tenant == TENANT and audit.time == later  # named by the store, from the event
    assert await store.webhook_pending() == 3
    # First the redelivered event, then the ones that waited, one at a time in seq order.
    first = await store.claim_webhooks(later, 10, lease=20)
    assert [(e.event_id, e.attempts) for e in first] == [(e1, 0)]
    await store.finish_webhook(e1, delivered=True, attempts=1, next_at=None, now=later)
    assert await deliver_all(store, later) == [e2, e3]
    assert await store.list_webhooks(limit=10) == ([], False)
    assert await store.webhook_pending() == 0
    assert other.rid != rec.rid


async def test_list_webhooks_filters_and_pages_newest_first(store: Store) -> None:
    made: list[tuple[str, str]] = []  # (event id, tenant)
    for i, tenant in enumerate([TENANT, OTHER, TENANT, OTHER]):
        _, _, events = await three_events(store, tenant=tenant, at=T0 + 10 * i)
        made += [(e, tenant) for e in events]
    now = T0 + 100
    heads = await store.claim_webhooks(now, 100, lease=20)
    assert len(heads) == 4
    for e in heads[:3]:  # three tasks' first events die
        await store.finish_webhook(e.event_id, delivered=False, attempts=7, next_at=None, now=now, error="timeout")
    dead_ids = {e.event_id for e in heads[:3]}
    newest_first = sorted(made, reverse=True)

    async def walk(**filters: Any) -> list[str]:
        ids: list[str] = []
        after = None
        while True:
            page, more = await store.list_webhooks(limit=2, after=after, **filters)
            ids += [e.event_id for e in page]
            if not more:
                return ids
            assert len(page) == 2
            after = page[-1].event_id

    assert await walk() == [e for e, _ in newest_first]
    assert await walk(state="dead") == [e for e, _ in newest_first if e in dead_ids]
    assert await walk(state="pending") == [e for e, _ in newest_first if e not in dead_ids]
    assert await walk(tenant=OTHER) == [e for e, t in newest_first if t == OTHER]
    assert await walk(tenant=TENANT, state="dead") == [e for e, t in newest_first if t == TENANT and e in dead_ids]
    assert await walk(tenant="nobody") == []
    # A page's last event may be delivered before the next page is asked for.
    page, _ = await store.list_webhooks(limit=1, state="pending")
    last_head = heads[3].event_id
    await store.finish_webhook(last_head, delivered=True, attempts=1, next_at=None, now=now)
    after_gone, _ = await store.list_webhooks(limit=100, after=last_head)
    assert [e.event_id for e in after_gone] == [e for e, _ in newest_first if e < last_head]
    assert page[0].event_id == newest_first[0][0]


async def test_redelivering_an_unknown_or_undead_event_writes_nothing(store: Store) -> None:
    _, _, (e1, e2, _) = await three_events(store)
    assert await store.redeliver_webhook("evt_nobody", T0, audit_entry("webhook.redeliver")) is None
    refused = await store.redeliver_webhook(e2, T0 + 50, audit_entry("webhook.redeliver"))  # pending
    assert refused is not None and refused[1] is False and refused[0].state == "pending"
    assert refused[0].event_id == e2 and refused[0].next_at == T0 + 2
    await store.claim_webhooks(T0 + 50, 10, lease=20)
    await store.finish_webhook(e1, delivered=True, attempts=1, next_at=None, now=T0 + 50)
    assert await store.redeliver_webhook(e1, T0 + 51, audit_entry("webhook.redeliver")) is None  # delivered: gone
    assert await store.list_audit(limit=10) == ([], False)
    assert await store.webhook_pending() == 2


async def test_concurrent_redeliveries_of_one_event_write_one_entry(store: Store) -> None:
    _, _, (e1, _, _) = await three_events(store)
    await kill(store, e1, T0 + 10)
    results = await asyncio.gather(
        *(store.redeliver_webhook(e1, T0 + 20, audit_entry("webhook.redeliver", at=T0 + 20)) for _ in range(20))
    )
    assert sorted(r[1] for r in results if r is not None) == [False] * 19 + [True]
    assert await audit_actions(store) == ["webhook.redeliver"]
    assert await store.webhook_pending() == 3


async def test_a_dead_event_is_kept_for_its_retention_then_frees_its_task(store: Store) -> None:
    _, _, (e1, e2, e3) = await three_events(store)
    died = T0 + 10
    await kill(store, e1, died)
    before_end = died + DEAD_EVENT_RETENTION - 1
    await store.maintain(before_end)
    assert await deliver_all(store, before_end) == []
    assert [e.event_id for e in (await store.list_webhooks(limit=10, state="dead"))[0]] == [e1]
    after_end = died + DEAD_EVENT_RETENTION
    await store.maintain(after_end)
    assert await deliver_all(store, after_end) == [e2, e3]
    assert await store.list_webhooks(limit=10) == ([], False)
    assert await store.redeliver_webhook(e1, after_end, audit_entry("webhook.redeliver")) is None


# --- revocation ---------------------------------------------------------------------------


async def test_revoke_key_once_then_answer_it_as_stored(store: Store) -> None:
    key = key_record("key_revoke")
    await store.create_key(key, audit_entry("key.create", key_id=key.id))
    version = await store.directory_version()
    assert await store.revoke_key("key_nobody", T0 + 1, audit_entry("key.revoke")) is None
    revoked = await store.revoke_key(key.id, T0 + 5, audit_entry("key.revoke", key_id=key.id))
    assert revoked is not None and revoked.revoked_at == T0 + 5 and revoked.secret_hash == key.secret_hash
    assert await store.get_key(key.id) == revoked and await store.directory_version() == version + 1
    again = await store.revoke_key(key.id, T0 + 9, audit_entry("key.revoke", key_id=key.id))
    assert again == revoked  # the first revoked_at, nothing written
    assert await store.directory_version() == version + 1
    assert await audit_actions(store) == ["key.revoke", "key.create"]


async def test_concurrent_revocations_write_one_entry_and_one_revoked_at(store: Store) -> None:
    """A read-then-write revoke would let each of 20 racing callers see the key unrevoked,
    write an entry each and leave the last one's time."""
    key = key_record("key_revoke_race")
    await store.create_key(key, audit_entry("key.create", key_id=key.id))
    version, n = await store.directory_version(), 20
    results = await asyncio.gather(
        *(store.revoke_key(key.id, T0 + i, audit_entry("key.revoke", key_id=key.id, at=T0 + i)) for i in range(n))
    )
    stored = await store.get_key(key.id)
    assert stored is not None and stored.revoked_at is not None
    assert all(r == stored for r in results)  # every caller is answered the one revocation
    assert await store.directory_version() == version + 1
    revokes, _ = await store.list_audit(limit=100, action="key.revoke")
    assert [e.time for e in revokes] == [stored.revoked_at]


async def test_append_audit_is_idempotent_by_id(store: Store) -> None:
    """The workers of one reload each write its entry under one id: the store keeps one."""
    first = audit_entry("config.reload", tenant=None, at=T0)
    first.changes = {"result": "ok", "problems": 0}
    same_id = AuditEntry(**{**first.__dict__, "time": T0 + 1, "changes": {"result": "error", "problems": 1}})
    results = await asyncio.gather(store.append_audit(first), *(store.append_audit(same_id) for _ in range(5)))
    assert results == [True] + [False] * 5
    assert await store.list_audit(limit=10) == ([first], False)


async def test_redis_redelivers_a_dead_event_left_by_an_older_gateway(redis_url: str) -> None:
    """Before dead events held their task back, Redis took a dead event out of its task's
    queue, gave it a TTL and let the later events go. Redelivered, it goes back to the head
    of the queue: before the task's events still queued, and kept (no TTL) until delivered."""
    from gateway.store.redis import RedisStore

    prefix = f"gwtest:{uuid.uuid4().hex[:8]}:"
    store = RedisStore(redis_url, prefix=prefix)
    await store.open()
    r = store._r.execute
    try:
        rec, _, (e1, e2, e3) = await three_events(store)
        assert [e.event_id for e in await store.claim_webhooks(T0 + 10, 10, lease=20)] == [e1]
        # what finish_webhook did then: out of the queue and the schedule, next one up
        await r("HSET", f"{prefix}wh:{e1}", "state", "dead", "attempts", "20")
        await r("PEXPIRE", f"{prefix}wh:{e1}", 7 * 86400 * 1000)
        await r("LREM", f"{prefix}whq:{rec.rid}", 1, e1)
        await r("ZREM", f"{prefix}whdue", e1)
        await r("ZADD", f"{prefix}whdue", T0 + 2, e2)
        await r("DECR", f"{prefix}whn")
        for index in ("whl", f"whlt:{TENANT}"):  # older gateways kept no listing index
            await r("ZREM", f"{prefix}{index}", e1)
        [second] = await store.claim_webhooks(T0 + 11, 10, lease=20)  # the later events went on
        assert second.event_id == e2
        await store.finish_webhook(e2, delivered=True, attempts=1, next_at=None, now=T0 + 11)
        redelivered = await store.redeliver_webhook(e1, T0 + 20, audit_entry("webhook.redeliver", at=T0 + 20))
        assert redelivered is not None and redelivered[1] and await r("TTL", f"{prefix}wh:{e1}") == -1
        assert [e.event_id for e in (await store.list_webhooks(limit=10))[0]] == [e3, e1]
        assert await store.webhook_pending() == 2
        assert await deliver_all(store, T0 + 20) == [e1, e3]
    finally:
        await store.close()
        await _delete_prefix(redis_url, prefix)


# --- the usage ledger ---------------------------------------------------------------------

KEY_A, KEY_B = "key_aaaa", "key_bbbb"
T0_DAY = "2026-01-15"


def ledger_row(day: str = T0_DAY, tenant: str = TENANT, key_id: str | None = KEY_A, **counts: int) -> LedgerRow:
    return LedgerRow(day, tenant, key_id, **counts)


async def keyed_create(
    store: Store, key_id: str | None, *, now: float = T0, tenant: str = TENANT, credits: int = PRICE
) -> tuple[TaskRecord, str]:
    """Admit a reservation made with `key_id` and record the upstream's PENDING answer."""
    rec = reservation(tenant=tenant, now=now, credits=credits)
    rec.key_id = key_id
    adm = await store.admit_create(tenant, NO_LIMITS, Charge(credits, day_key(now), month_key(now)), rec, now)
    assert adm.ok
    task_id = f"task-{uuid.uuid4().hex[:12]}"
    res = await store.apply_update(rec.rid, tenant, task_obj(task_id, "PENDING"), now, refund_failed=True)
    assert res.record is not None and res.record.key_id == key_id
    return res.record, task_id


async def test_ledger_books_an_admission_and_a_create_never_made_leaves_no_trace(store: Store) -> None:
    rec = reservation()
    rec.key_id = KEY_A
    assert (await store.admit_create(TENANT, NO_LIMITS, Charge(PRICE, T0_DAY, "2026-01"), rec, T0)).ok
    assert (await store.get_by_rid(rec.rid)).key_id == KEY_A  # type: ignore[union-attr]
    assert await store.ledger(T0_DAY, T0_DAY) == [ledger_row(tasks_created=1, credits_charged=PRICE)]
    assert (await store.usage(TENANT, T0)).tasks_this_month == 1
    await store.mark_unknown(rec.rid, T0 + 1)  # an unknown outcome keeps its charge
    assert await store.ledger(T0_DAY, T0_DAY) == [ledger_row(tasks_created=1, credits_charged=PRICE)]
    assert await store.settle_not_created(rec.rid, T0 + 2)
    assert await store.ledger("2026-01-01", "2026-01-31") == []
    assert await store.usage(TENANT, T0 + 2) == Usage()
    assert not await store.settle_not_created(rec.rid, T0 + 3)  # settles once: nothing booked twice
    assert await store.ledger("2026-01-01", "2026-01-31") == []


async def test_ledger_books_terminal_states_when_they_happen_and_refunds_once(store: Store) -> None:
    outcomes = [("SUCCEEDED", True), ("FAILED", True), ("CANCELLED", True), ("FAILED", False)]
    for status, refund in outcomes:
        rec, tid = await keyed_create(store, KEY_A)
        running = task_obj(tid, "RUNNING", "2026-01-15T12:00:10Z")
        assert (await store.apply_update(rec.rid, TENANT, running, T0 + 10, refund_failed=refund)).applied
        end = task_obj(tid, status, "2026-01-15T12:01:00Z")
        for _ in range(3):  # repeated terminal callbacks book nothing more
            await store.apply_update(rec.rid, TENANT, end, T0 + 60, refund_failed=refund)
    assert await store.ledger(T0_DAY, T0_DAY) == [
        ledger_row(
            tasks_created=4, tasks_succeeded=1, tasks_failed=3, credits_charged=4 * PRICE, credits_refunded=2 * PRICE
        )
    ]
    usage = await store.usage(TENANT, T0 + 60)
    assert (usage.tasks_today, usage.credits_today, usage.tasks_this_month) == (4, 2 * PRICE, 4)


@pytest.mark.parametrize("host_zone", list(HOST_ZONES), indirect=True)
async def test_a_refund_after_utc_midnight_is_booked_on_the_charge_day(store: Store, host_zone: str) -> None:
    eve = datetime(2026, 1, 31, 23, 59, 59, tzinfo=UTC).timestamp()
    after = eve + 2
    failed_rec, failed_tid = await keyed_create(store, KEY_A, now=eve)
    done_rec, done_tid = await keyed_create(store, KEY_B, now=eve)
    fresh, _ = await keyed_create(store, KEY_A, now=after)
    res = await store.apply_update(
        failed_rec.rid, TENANT, task_obj(failed_tid, "FAILED", "2026-02-01T00:00:01Z"), after, refund_failed=True
    )
    assert res.refunded_credits == PRICE
    await store.apply_update(
        done_rec.rid, TENANT, task_obj(done_tid, "SUCCEEDED", "2026-02-01T00:00:01Z"), after, refund_failed=True
    )
    assert await store.ledger("2026-01-31", "2026-02-01") == [
        ledger_row("2026-01-31", tasks_created=1, credits_charged=PRICE, credits_refunded=PRICE),
        ledger_row("2026-01-31", key_id=KEY_B, tasks_created=1, credits_charged=PRICE),
        ledger_row("2026-02-01", tasks_created=1, tasks_failed=1, credits_charged=PRICE),
        ledger_row("2026-02-01", key_id=KEY_B, tasks_succeeded=1),
    ]
    assert await store.ledger("2026-02-01", "2026-02-28") == (await store.ledger("2026-01-31", "2026-02-01"))[2:]
    # The quotas of the new day and month hold only the fresh task, as the ledger's February does.
    assert await store.usage(TENANT, after) == Usage(1, 1, PRICE, PRICE, 1)
    assert fresh.charge_day == "2026-02-01"


async def test_a_lagging_clock_books_the_day_it_charged(store: Store) -> None:
    """A replica whose clock is behind charges the stored, newer period (rules.Quota.roll):
    the reservation and the ledger name that day too, so a refund finds its charge."""
    after = datetime(2026, 2, 1, 0, 0, 1, tzinfo=UTC).timestamp()
    await keyed_create(store, KEY_A, now=after)
    late, tid = await keyed_create(store, KEY_A, now=after - 5)  # 2026-01-31 on this clock
    assert (late.charge_day, late.charge_month) == ("2026-02-01", "2026-02")
    await store.apply_update(late.rid, TENANT, task_obj(tid, "FAILED"), after + 1, refund_failed=True)
    assert await store.ledger("2026-01-01", "2026-02-28") == [
        ledger_row("2026-02-01", tasks_created=2, tasks_failed=1, credits_charged=2 * PRICE, credits_refunded=PRICE)
    ]
    assert await store.usage(TENANT, after + 1) == Usage(1, 2, PRICE, PRICE, 2)


async def test_adoption_books_a_charge_without_a_key(store: Store) -> None:
    rid = new_rid()
    adopt = TaskRecord(rid=rid, tenant_id=TENANT, credits=PRICE, created_at=T0, updated_at=T0)
    results = await asyncio.gather(
        *(
            store.apply_update(rid, TENANT, task_obj("t-adopted", "FAILED"), T0, refund_failed=True, adopt=adopt)
            for _ in range(5)
        )
    )
    assert sum(r.adopted for r in results) == 1
    assert await store.ledger(T0_DAY, T0_DAY) == [
        ledger_row(key_id=None, tasks_created=1, tasks_failed=1, credits_charged=PRICE, credits_refunded=PRICE)
    ]


async def test_ledger_rows_are_filtered_and_sorted(store: Store) -> None:
    day2 = T0 + 86400
    for key_id, tenant, now in [  # in time order: a clock going back would charge the later day
        (KEY_B, TENANT, T0),
        (KEY_A, OTHER, T0),
        (KEY_A, TENANT, T0),
        (None, TENANT, T0),
        (KEY_A, TENANT, T0),
        (KEY_B, TENANT, day2),
    ]:
        await keyed_create(store, key_id, now=now, tenant=tenant)
    one = {"tasks_created": 1, "credits_charged": PRICE}
    two = {"tasks_created": 2, "credits_charged": 2 * PRICE}
    everything = [
        ledger_row(key_id=None, **one),
        ledger_row(**two),
        ledger_row(key_id=KEY_B, **one),
        ledger_row(tenant=OTHER, **one),
        ledger_row("2026-01-16", key_id=KEY_B, **one),
    ]
    assert await store.ledger("2026-01-01", "2026-12-31") == everything
    assert await store.ledger(T0_DAY, T0_DAY) == everything[:4]
    assert await store.ledger("2026-01-16", "2026-01-16") == everything[4:]
    assert await store.ledger("2026-01-17", "2026-01-20") == []
    assert await store.ledger("2026-01-01", "2026-12-31", tenant=OTHER) == [everything[3]]
    assert await store.ledger("2026-01-01", "2026-12-31", key_id=KEY_B) == [everything[2], everything[4]]
    assert await store.ledger("2026-01-01", "2026-12-31", tenant=OTHER, key_id=KEY_B) == []
    assert await store.ledger("2026-01-01", "2026-12-31", tenant=TENANT, key_id=KEY_A) == [everything[1]]


async def test_ledger_rows_are_kept_at_least_400_days(store: Store, store_spec: StoreSpec) -> None:
    await keyed_create(store, KEY_A)
    expected = [ledger_row(tasks_created=1, credits_charged=PRICE)]
    if store_spec.kind == "redis":
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(store_spec.target)
        try:
            ttl_ms = await client.pttl(f"{store_spec.prefix}led:{T0_DAY}")
        finally:
            await client.aclose()
        assert 399.9 * 86400_000 <= ttl_ms <= 400 * 86400_000
        return
    await store.maintain(T0 + 400 * 86400)  # the 400th day after: still kept
    assert await store.ledger(T0_DAY, T0_DAY) == expected
    await store.maintain(T0 + 401 * 86400)
    assert await store.ledger(T0_DAY, T0_DAY) == []


async def test_racing_charges_and_refunds_leave_the_ledger_equal_to_the_quotas(store: Store) -> None:
    """Many creates at once under a credit budget, each then settled at once as a racing
    mix: not created (reversed), FAILED (refunded) or SUCCEEDED, on two keys and two
    tenants. For each tenant the day's ledger equals its quota counters."""
    limits = Limits(credits_per_day=40 * PRICE)
    fates = ["not_created", "failed", "succeeded"]

    async def one(i: int) -> None:
        tenant = (TENANT, OTHER)[i % 2]
        rec = reservation(tenant=tenant)
        rec.key_id = (KEY_A, KEY_B, None)[i % 3]
        adm = await store.admit_create(tenant, limits, Charge(PRICE, T0_DAY, "2026-01"), rec, T0)
        if not adm.ok:
            return
        fate = fates[(i // 6) % 3]
        if fate == "not_created":
            assert await store.settle_not_created(rec.rid, T0 + 1)
            return
        tid = f"task-{rec.rid}"
        await store.apply_update(rec.rid, tenant, task_obj(tid, "PENDING"), T0 + 1, refund_failed=True)
        end = task_obj(tid, "FAILED" if fate == "failed" else "SUCCEEDED")
        await asyncio.gather(*(store.apply_update(rec.rid, tenant, end, T0 + 2, refund_failed=True) for _ in range(3)))

    await asyncio.gather(*(one(i) for i in range(120)))
    rows = await store.ledger(T0_DAY, T0_DAY)
    assert {r.key_id for r in rows} == {KEY_A, KEY_B, None}
    for tenant in (TENANT, OTHER):
        mine = [r for r in rows if r.tenant_id == tenant]
        usage = await store.usage(tenant, T0 + 2)
        assert usage.active == 0
        assert sum(r.tasks_created for r in mine) == usage.tasks_today == usage.tasks_this_month
        net = sum(r.credits_charged - r.credits_refunded for r in mine)
        assert net == usage.credits_today == usage.credits_this_month
        assert sum(r.tasks_succeeded + r.tasks_failed for r in mine) == usage.tasks_today
        assert sum(r.credits_refunded for r in mine) == PRICE * sum(r.tasks_failed for r in mine)
        assert 0 < usage.tasks_today < 40  # the budget was reached, then partly given back


async def test_a_refused_create_books_nothing(store: Store) -> None:
    await keyed_create(store, KEY_A)
    before = await store.ledger(T0_DAY, T0_DAY)
    for limits in (Limits(max_active_tasks=1), Limits(tasks_per_day=1), Limits(credits_per_month=PRICE)):
        rec = reservation()
        rec.key_id = KEY_B
        assert not (await store.admit_create(TENANT, limits, Charge(PRICE, T0_DAY, "2026-01"), rec, T0)).ok
    assert await store.ledger(T0_DAY, T0_DAY) == before == [ledger_row(tasks_created=1, credits_charged=PRICE)]
    assert (await store.usage(TENANT, T0)).tasks_this_month == 1


# --- a key's own limits (contract §15) ----------------------------------------------------

KEY = "key_svc"


async def admit_key(
    store: Store, limits: Limits, key_limits: Limits, *, now: float = T0, credits: int = PRICE
) -> tuple[Admission, TaskRecord]:
    """A create by the API key KEY, whose own limits are checked with the tenant's."""
    rec = reservation(now=now, credits=credits)
    rec.key_id = KEY
    adm = await store.admit_create(
        TENANT, limits, Charge(credits, day_key(now), month_key(now)), rec, now, None, KeyLimits(KEY, key_limits)
    )
    return adm, rec


KEY_RACES = {  # the key's limit under a looser tenant limit of the same kind: exactly the key's
    "max_active_tasks": (Limits(max_active_tasks=10), Limits(max_active_tasks=3), 3),
    "tasks_per_minute": (Limits(tasks_per_minute=10), Limits(tasks_per_minute=4), 4),
    "credits_per_day": (Limits(credits_per_day=1000), Limits(credits_per_day=50), 5),
}


@pytest.mark.parametrize("limit", list(KEY_RACES))
async def test_racing_creates_admit_exactly_the_keys_limit_under_the_tenants(store: Store, limit: str) -> None:
    tenant_limits, key_limits, expected = KEY_RACES[limit]
    results = await asyncio.gather(*(admit_key(store, tenant_limits, key_limits) for _ in range(20)))
    admitted = [rec for adm, rec in results if adm.ok]
    assert len(admitted) == expected
    refusals = {(adm.limit, adm.code) for adm, _ in results if not adm.ok}
    assert refusals == {("key_" + limit, "rate_limit_exceeded")}
    assert all(rec.key_limited and rec.key_id == KEY for rec in admitted)
    charged = Usage(expected, expected, expected * PRICE, expected * PRICE, expected)
    assert await store.usage(TENANT, T0) == charged
    assert await store.key_usage(KEY, T0) == charged
    # a refused create changed neither quota: the tenant still admits without the key
    assert (await admit(store, tenant_limits))[0].ok


async def test_the_tighter_of_tenant_and_key_refuses_and_names_itself(store: Store) -> None:
    # the tenant's limit is the tighter: refused on the tenant's, the key's counters untouched
    for _ in range(2):
        assert (await admit_key(store, Limits(max_active_tasks=2), Limits(max_active_tasks=3)))[0].ok
    refused, _ = await admit_key(store, Limits(max_active_tasks=2), Limits(max_active_tasks=3))
    assert (refused.limit, refused.code) == ("max_active_tasks", "concurrency_limit_exceeded")
    assert (await store.key_usage(KEY, T0)).active == 2
    # the key's budget is the tighter: its retry-after is the tenant rule's
    refused, _ = await admit_key(store, Limits(), Limits(credits_per_month=25))
    assert (refused.limit, refused.retry_after) == ("key_credits_per_month", seconds_to_next_month(T0))


async def test_create_headers_report_the_tightest_bucket_of_tenant_and_key(store: Store) -> None:
    tenant, key = Limits(requests_per_minute=10), Limits(tasks_per_minute=3)
    adm, _ = await admit_key(store, tenant, key)
    assert adm.ok and adm.rate == RateInfo(3, 2, 20.0)  # the key's bucket has fewer left
    for _ in range(2):
        assert (await admit_key(store, tenant, key))[0].ok
    refused, rec = await admit_key(store, tenant, key)
    assert refused.limit == "key_tasks_per_minute" and refused.retry_after == 20.0
    assert refused.rate == RateInfo(3, 0, 60.0) and await store.get_by_rid(rec.rid) is None
    # the refusal took no tenant token: 3 taken of 10
    assert (await store.take_request(TENANT, tenant, T0)).rate == RateInfo(10, 6, 24.0)


async def test_a_keys_request_bucket_is_taken_with_the_tenants_or_not_at_all(store: Store) -> None:
    tenant, key = Limits(requests_per_minute=5), KeyLimits(KEY, Limits(requests_per_minute=2))
    for left in (1, 0):
        adm = await store.take_request(TENANT, tenant, T0, key)
        assert adm.ok and adm.rate == RateInfo(2, left, (2 - left) * 30.0)
    refused = await store.take_request(TENANT, tenant, T0, key)
    assert (refused.ok, refused.limit, refused.code) == (False, "key_requests_per_minute", "rate_limit_exceeded")
    assert refused.retry_after == 30.0 and refused.rate == RateInfo(2, 0, 60.0)
    # the refusal spent no tenant token: 3 left of 5 for a request without the key
    assert (await store.take_request(TENANT, tenant, T0)).rate == RateInfo(5, 2, 36.0)
    # a status poll draws both the same way
    rec, tid = await create(store)
    refused, got = await store.read_task(TENANT, tenant, tid, T0, key)
    assert not refused.ok and refused.limit == "key_requests_per_minute" and got is None
    adm, got = await store.read_task(TENANT, tenant, tid, T0 + 30, key)
    assert adm.ok and got is not None and got.rid == rec.rid
    # the tenant's bucket refuses first when it is the empty one
    while (await store.take_request(TENANT, tenant, T0 + 30)).ok:
        pass
    refused = await store.take_request(TENANT, tenant, T0 + 30, KeyLimits(KEY, Limits(requests_per_minute=9)))
    assert refused.limit == "requests_per_minute"


async def test_every_release_of_a_task_frees_its_keys_quota_too(store: Store) -> None:
    key = Limits(max_active_tasks=5, credits_per_day=1000)
    finished, failed, expired, not_created, unknown = [(await admit_key(store, Limits(), key))[1] for _ in range(5)]
    assert (await store.key_usage(KEY, T0)).active == 5
    for rec, status in ((finished, "SUCCEEDED"), (failed, "FAILED")):
        res = await store.apply_update(rec.rid, TENANT, task_obj(f"t-{rec.rid}", status), T0 + 1, refund_failed=True)
        assert res.finished
    assert await store.settle_not_created(not_created.rid, T0 + 2)
    await store.apply_update(expired.rid, TENANT, task_obj(f"t-{expired.rid}", "RUNNING"), T0 + 1, refund_failed=True)
    await store.mark_unknown(unknown.rid, T0 + 1)
    assert {r.rid for r in await store.expire_tasks(T0 + 100, 50, 50)} == {expired.rid, unknown.rid}
    # 5 charged; FAILED refunded its credits, the create never made refunded its task too
    assert await store.key_usage(KEY, T0 + 100) == Usage(0, 4, 30, 30, 4)
    assert await store.usage(TENANT, T0 + 100) == Usage(0, 4, 30, 30, 4)
    assert await nonzero_active(store) == {}


async def test_a_key_without_limits_has_no_key_quota(store: Store) -> None:
    rec = reservation()
    rec.key_id = KEY
    adm = await store.admit_create(TENANT, Limits(), Charge(PRICE, day_key(T0), month_key(T0)), rec, T0)
    assert adm.ok and not rec.key_limited
    stored = await store.get_by_rid(rec.rid)
    assert stored is not None and stored.key_id == KEY and not stored.key_limited
    await store.apply_update(rec.rid, TENANT, task_obj("t-free", "SUCCEEDED"), T0 + 1, refund_failed=True)
    assert await store.key_usage(KEY, T0) == Usage()
    # a task admitted under key limits keeps saying so
    _, limited = await admit_key(store, Limits(), Limits(tasks_per_day=9))
    again = await store.get_by_rid(limited.rid)
    assert again is not None and again.key_limited and again.key_id == KEY


async def test_a_keys_limits_scopes_and_networks_round_trip_and_change(store: Store) -> None:
    key = key_record(
        "key_lim",
        limits=Limits(requests_per_minute=60, max_active_tasks=2),
        scopes=("read",),
        allowed_cidrs=("10.20.0.0/16", "2001:db8::/32"),
    )
    await store.create_key(key, audit_entry("key.create", key_id=key.id))
    assert await store.get_key(key.id) == key
    changed = await store.update_key(
        key.id,
        {
            "limits": {"max_active_tasks": None, "tasks_per_day": 50},
            "scopes": ["create", "read"],
            "allowed_cidrs": None,
        },
        audit_entry("key.update", key_id=key.id),
    )
    assert changed is not None and changed == await store.get_key(key.id)
    assert changed.limits == Limits(requests_per_minute=60, tasks_per_day=50)
    assert (changed.scopes, changed.allowed_cidrs) == (("create", "read"), None)
    snapshot = await store.load_directory()
    assert [k for k in snapshot.keys if k.id == key.id] == [changed]
    plain = key_record("key_plain")
    await store.create_key(plain, audit_entry("key.create", key_id=plain.id))
    assert await store.get_key(plain.id) == plain and plain.scopes is None and plain.limits == Limits()


async def test_a_new_redis_task_hash_holds_no_default_field(redis_url: str) -> None:
    """A Redis task hash is written without the fields at their default (empty, 0, false,
    "gen2"): fewer fields to write and to return on every read (docs/benchmarks.md,
    Round 3). Every reader takes a missing field for its default, so the record reads back
    whole, before and after the upstream's answer, and a finished one too."""
    spec = StoreSpec("redis", redis_url, f"gwtest:{uuid.uuid4().hex[:8]}:")
    store = spec.make()
    await store.open()
    try:
        adm, rec = await admit(store, NO_LIMITS)
        assert adm.ok
        raw = _pairs_of(await store._r.execute("HGETALL", store._k("t", rec.rid)))  # type: ignore[attr-defined]
        assert set(raw) == {
            "rid", "tenant_id", "status", "rank", "credits", "charge_day", "charge_month",
            "created_at", "updated_at", "next_poll_at", "active", "m:model",
        }  # fmt: skip
        got = await store.get_by_rid(rec.rid)
        assert got is not None
        assert (got.task_id, got.key_index, got.task, got.hook, got.task_type, got.key_id, got.relay) == (
            None, 0, {}, "", "gen2", None, "",
        )  # fmt: skip
        assert (got.active, got.settled, got.timed_out, got.deleted, got.key_limited) == (
            True,
            False,
            False,
            False,
            False,
        )
        assert (got.status, got.credits, got.charge_day, got.meta) == ("SUBMITTING", PRICE, T0_DAY, {"model": "gen2"})
        done = await store.apply_update(rec.rid, TENANT, task_obj("up-1", "FAILED"), T0 + 1, refund_failed=True)
        assert done.record is not None and done.finished and done.refunded_credits == PRICE
        assert (done.record.task_id, done.record.active, done.record.settled) == ("up-1", False, True)
        usage = await store.usage(TENANT, T0 + 1)
        assert (usage.active, usage.tasks_today, usage.credits_today) == (0, 1, 0)
    finally:
        await store.close()
        await _delete_prefix(spec.target, spec.prefix)


def _pairs_of(flat: list[bytes]) -> dict[str, bytes]:
    return {flat[i].decode(): flat[i + 1] for i in range(0, len(flat), 2)}
