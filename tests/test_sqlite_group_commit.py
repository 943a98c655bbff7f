"""SQLite group commit: the writes of one event-loop turn share one transaction.

What must hold: many operations of a turn cost one COMMIT, and a group that keeps growing
under load stays open a few turns, while a lone operation is not delayed; an operation that
fails rolls back its own writes only; no caller resumes before its writes are committed (a
second connection, as another worker would be, sees them at once); reads see committed
data only.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.store.base import Charge, Limits, StoreUnavailable, TaskRecord, Usage
from gateway.store.rules import day_key, month_key
from gateway.store.sqlite import MAX_GROUP_TURNS, SQLiteStore
from gateway.tasks import new_rid

T0 = 1_768_478_400.0  # 2026-01-15 12:00 UTC
TENANT = "acme"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(str(tmp_path / "gateway.db"))
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def statements(store: SQLiteStore) -> list[str]:
    """Every statement the store's connection runs from now on (SQLite's own trace hook)."""
    seen: list[str] = []
    store.db.set_trace_callback(seen.append)
    return seen


def reservation(rid: str | None = None) -> TaskRecord:
    return TaskRecord(rid=rid or f"req_{uuid.uuid4().hex}", tenant_id=TENANT, credits=5, created_at=T0, updated_at=T0)


async def admit(store: SQLiteStore, rec: TaskRecord, limits: Limits | None = None) -> bool:
    adm = await store.admit_create(TENANT, limits or Limits(), Charge(5, day_key(T0), month_key(T0)), rec, T0)
    return adm.ok


async def test_operations_of_one_turn_share_one_commit(store: SQLiteStore) -> None:
    await store.take_request(TENANT, Limits(requests_per_minute=100), T0)  # the quota row exists
    seen = statements(store)
    results = await asyncio.gather(
        *(store.take_request(TENANT, Limits(requests_per_minute=100), T0) for _ in range(20))
    )
    assert [r.rate.remaining for r in results if r.rate] == list(range(98, 78, -1))
    assert seen.count("BEGIN IMMEDIATE") == 1 and seen.count("COMMIT") == 1
    assert seen.count("SAVEPOINT op") == 20 and seen.count("RELEASE op") == 20
    # Operations one after the other (each awaited) are one transaction each.
    seen.clear()
    for _ in range(3):
        await store.take_request(TENANT, Limits(requests_per_minute=100), T0)
    assert seen.count("COMMIT") == 3


async def after_turns(turns: int, store: SQLiteStore) -> None:
    for _ in range(turns):
        await asyncio.sleep(0)
    await store.take_request(TENANT, Limits(requests_per_minute=1000), T0)


async def test_a_growing_group_stays_open_a_few_turns(store: SQLiteStore) -> None:
    await store.take_request(TENANT, Limits(requests_per_minute=1000), T0)
    seen = statements(store)
    # Operations arriving in three consecutive turns, as requests do under load: one COMMIT.
    await asyncio.gather(*(after_turns(t, store) for t in (0, 0, 1, 2)))
    assert seen.count("BEGIN IMMEDIATE") == 1 and seen.count("COMMIT") == 1
    assert seen.count("RELEASE op") == 4
    # One operation in every turn for longer than a group may stay open: several groups.
    seen.clear()
    train = MAX_GROUP_TURNS + 4
    await asyncio.gather(*(after_turns(t, store) for t in [0, *range(train)]))
    assert seen.count("RELEASE op") == train + 1
    first_group = seen[: seen.index("COMMIT")]
    assert first_group.count("RELEASE op") == MAX_GROUP_TURNS + 2  # turn 1's two, then one per kept turn
    assert seen.count("COMMIT") >= 2


async def test_a_lone_operation_commits_at_the_next_turn(store: SQLiteStore) -> None:
    """An idle gateway must not wait for a group to grow: no added latency at one request."""
    seen = statements(store)
    op = asyncio.ensure_future(store.take_request(TENANT, Limits(requests_per_minute=10), T0))
    await asyncio.sleep(0)  # the operation runs its statements
    assert seen.count("RELEASE op") == 1 and "COMMIT" not in seen
    await asyncio.sleep(0)  # the next turn commits it
    assert seen.count("COMMIT") == 1
    assert (await op).ok


async def test_reads_see_committed_data_only(store: SQLiteStore) -> None:
    rec = reservation()
    pending = asyncio.ensure_future(admit(store, rec))
    await asyncio.sleep(0)  # its INSERT has run; the COMMIT is due next turn
    assert store.db.in_transaction
    assert await store.get_by_rid(rec.rid) is None
    assert await pending is True
    got = await store.get_by_rid(rec.rid)
    assert got is not None and got.rid == rec.rid


def test_reservation_ids_sort_by_creation_time() -> None:
    """New rids append to the rid index (few dirty pages per group) instead of landing on
    a random page of it; same length as before, 80 random bits within a millisecond."""
    ids = [new_rid(T0 + i / 1000) for i in range(50)]
    assert ids == sorted(ids) and len(set(ids)) == 50
    assert all(len(i) == 36 and i.startswith("gwr_") for i in ids)
    assert new_rid(T0) != new_rid(T0)


async def test_a_failing_operation_rolls_back_only_its_own_writes(store: SQLiteStore) -> None:
    """A duplicate rid fails at its INSERT, after its quota update: that update must go,
    while the other creates of the same transaction stay."""
    dup = f"req_{uuid.uuid4().hex}"
    limits = Limits(tasks_per_day=10, credits_per_day=100)
    outcomes = await asyncio.gather(
        admit(store, reservation(dup), limits),
        admit(store, reservation(dup), limits),
        admit(store, reservation(), limits),
        return_exceptions=True,
    )
    assert outcomes[0] is True and outcomes[2] is True
    assert isinstance(outcomes[1], sqlite3.IntegrityError)
    assert await store.usage(TENANT, T0) == Usage(
        active=2, tasks_today=2, credits_today=10, credits_this_month=10, tasks_this_month=2
    )
    assert store.db.execute("SELECT COUNT(*) FROM tasks").fetchone()[0] == 2
    assert not store.db.in_transaction


async def test_no_caller_resumes_before_its_writes_are_committed(store: SQLiteStore) -> None:
    other = sqlite3.connect(store.path)  # another worker's view: committed data only
    try:

        async def create_and_look() -> int:
            rec = reservation()
            assert await admit(store, rec)
            return other.execute("SELECT COUNT(*) FROM tasks WHERE rid = ?", (rec.rid,)).fetchone()[0]

        assert await asyncio.gather(*(create_and_look() for _ in range(10))) == [1] * 10
        assert other.execute("SELECT active, day_tasks FROM quota WHERE tenant = ?", (TENANT,)).fetchone() == (10, 10)
    finally:
        other.close()


async def test_close_commits_an_open_group(store: SQLiteStore) -> None:
    rec = reservation()
    pending = asyncio.ensure_future(admit(store, rec))
    await asyncio.sleep(0)  # the operation has run its statements; the COMMIT is still due
    assert store.db.in_transaction
    await store.close()
    assert await pending is True
    check = sqlite3.connect(store.path)
    try:
        assert check.execute("SELECT COUNT(*) FROM tasks WHERE rid = ?", (rec.rid,)).fetchone()[0] == 1
    finally:
        check.close()
    await store.open()  # for the fixture's close


async def test_waiting_for_another_process_lock_does_not_stop_the_loop(store: SQLiteStore) -> None:
    """Another worker holds the write lock: this worker's write waits on the event loop, so
    its reads go on meanwhile, and the write happens once the lock is free."""
    rec = reservation()
    assert await admit(store, rec)
    other = sqlite3.connect(store.path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        write = asyncio.ensure_future(store.take_request(TENANT, Limits(requests_per_minute=10), T0))
        reads = 0
        for _ in range(20):  # ~20 loop turns with a timer each: the loop is not blocked
            got = await store.get_by_rid(rec.rid)
            assert got is not None and got.rid == rec.rid
            reads += 1
            await asyncio.sleep(0.005)
        assert reads == 20 and not write.done()
        other.execute("COMMIT")
        admission = await asyncio.wait_for(write, 5)
        assert admission.ok and admission.rate is not None and admission.rate.remaining == 9
    finally:
        other.close()


async def test_a_lock_held_too_long_fails_the_operation_and_changes_nothing(store: SQLiteStore) -> None:
    assert store._write is not None
    store._write.lock_timeout = 0.2
    other = sqlite3.connect(store.path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreUnavailable, match="locked"):
            await admit(store, reservation())
        other.execute("COMMIT")
    finally:
        other.close()
    assert await store.usage(TENANT, T0) == Usage(active=0, tasks_today=0, credits_today=0, credits_this_month=0)
    assert await admit(store, reservation())  # the store works on once the lock is free


async def test_only_an_outage_is_store_unavailable_a_bad_schema_is_not(store: SQLiteStore) -> None:
    """A held write lock is an outage (StoreUnavailable, answered 503, readiness fails); a
    statement SQLite rejects (here a table someone dropped) is a bug and keeps its own error,
    answered 500, in a write group and on the read connection alike."""
    assert store._write is not None
    store._write.lock_timeout = 0.2
    other = sqlite3.connect(store.path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreUnavailable):
            await store.ping()
        other.execute("COMMIT")
        await store.ping()
        other.execute("DROP TABLE assets")
    finally:
        other.close()
    for op in (store.put_asset("a1", "image/png", b"x", T0 + 60, T0), store.get_asset("a1", T0)):
        with pytest.raises(sqlite3.OperationalError, match="no such table") as err:
            await op
        assert not isinstance(err.value, StoreUnavailable)
    assert await admit(store, reservation())  # the failed operation rolled back alone
