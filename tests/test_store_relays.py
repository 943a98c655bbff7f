# ruff: noqa: F811 - the fixtures of test_store_contract are imported by name and taken as arguments
"""The store's part of several relays (contract §14), on both stores (the fixtures of
tests/test_store_contract.py): a task records its relay and key, a failover moves the
reservation and its ledger booking in one step, active tasks are counted per relay, and
records and ledger rows written before relays had ids read as relay "" (the first relay).
"""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path

from test_store_contract import (  # noqa: F401 - fixtures, used by name
    NO_LIMITS,
    PRICE,
    T0,
    TENANT,
    StoreSpec,
    host_zone,
    reservation,
    store,
    store_spec,
    task_obj,
)

from gateway.store.base import Charge, KeyLimits, LedgerRow, Limits, Store, TaskRecord, Usage
from gateway.store.rules import day_key, month_key

DAY = day_key(T0)


async def admitted(store: Store, relay: str, key_index: int = 0, key_id: str | None = "key_a") -> TaskRecord:
    rec = reservation()
    rec.relay, rec.key_index, rec.key_id = relay, key_index, key_id
    assert (await store.admit_create(TENANT, NO_LIMITS, Charge(PRICE, DAY, month_key(T0)), rec, T0)).ok
    return rec


def row(relay: str, **counts: int) -> LedgerRow:
    return LedgerRow(DAY, TENANT, "key_a", relay=relay, **counts)


async def test_a_task_keeps_its_relay_and_key(store: Store) -> None:
    rec = await admitted(store, "backup", key_index=2)
    got = await store.get_by_rid(rec.rid)
    assert got is not None and (got.relay, got.key_index) == ("backup", 2)
    res = await store.apply_update(rec.rid, TENANT, task_obj("t-1", "PENDING"), T0 + 1, refund_failed=True)
    assert res.record is not None and (res.record.relay, res.record.key_index) == ("backup", 2)
    by_task = await store.get_by_task_id(TENANT, "t-1")
    assert by_task is not None and by_task.relay == "backup"
    (due,) = await store.claim_due_polls(T0 + 100, 5, 10, 3600, 86400)
    assert (due.relay, due.key_index) == ("backup", 2)


async def test_the_ledger_books_each_task_under_its_relay(store: Store) -> None:
    for relay in ("a", "a", "b"):
        rec = await admitted(store, relay)
        tid = f"t-{uuid.uuid4().hex[:8]}"
        await store.apply_update(rec.rid, TENANT, task_obj(tid, "PENDING"), T0, refund_failed=True)
        await store.apply_update(
            rec.rid, TENANT, task_obj(tid, "FAILED", "2026-01-15T12:01:00Z"), T0, refund_failed=True
        )
    assert await store.ledger(DAY, DAY) == [
        row("a", tasks_created=2, tasks_failed=2, credits_charged=2 * PRICE, credits_refunded=2 * PRICE),
        row("b", tasks_created=1, tasks_failed=1, credits_charged=PRICE, credits_refunded=PRICE),
    ]


async def test_assign_relay_moves_the_reservation_and_its_booking_at_once(store: Store) -> None:
    rec = await admitted(store, "a")
    assert await store.ledger(DAY, DAY) == [row("a", tasks_created=1, credits_charged=PRICE)]
    assert await store.assign_relay(rec.rid, "b", 1, T0 + 1)
    got = await store.get_by_rid(rec.rid)
    assert got is not None and (got.relay, got.key_index) == ("b", 1)
    assert await store.ledger(DAY, DAY) == [row("b", tasks_created=1, credits_charged=PRICE)]  # a: no trace
    assert await store.assign_relay(rec.rid, "b", 0, T0 + 2)  # another key, same relay: nothing moves
    assert await store.ledger(DAY, DAY) == [row("b", tasks_created=1, credits_charged=PRICE)]
    # refused by every relay: no trace anywhere
    assert await store.settle_not_created(rec.rid, T0 + 3)
    assert await store.ledger(DAY, DAY) == []


async def test_assign_relay_only_moves_a_create_not_yet_answered(store: Store) -> None:
    sent = await admitted(store, "a")
    await store.mark_unknown(sent.rid, T0 + 1)  # sent without an answer: it stays where it was sent
    assert not await store.assign_relay(sent.rid, "b", 0, T0 + 2)
    made = await admitted(store, "a")
    await store.apply_update(made.rid, TENANT, task_obj("t-made", "PENDING"), T0, refund_failed=True)
    assert not await store.assign_relay(made.rid, "b", 0, T0 + 2)
    assert not await store.assign_relay("req_unknown", "b", 0, T0 + 2)
    for rid in (sent.rid, made.rid):
        got = await store.get_by_rid(rid)
        assert got is not None and got.relay == "a"
    assert await store.ledger(DAY, DAY) == [row("a", tasks_created=2, credits_charged=2 * PRICE)]


async def test_active_tasks_are_counted_per_relay(store: Store) -> None:
    assert await store.active_by_relay() == {}
    done = await admitted(store, "a")
    await admitted(store, "a")
    await admitted(store, "b")
    await admitted(store, "")
    await store.apply_update(done.rid, TENANT, task_obj("t-done", "SUCCEEDED"), T0, refund_failed=True)
    assert await store.active_by_relay() == {"a": 1, "b": 1, "": 1}


async def test_a_record_without_a_relay_reads_as_relay_empty(store: Store) -> None:
    rec = reservation()  # as recorded before relays had ids
    assert rec.relay == ""
    assert (await store.admit_create(TENANT, NO_LIMITS, Charge(PRICE, DAY, month_key(T0)), rec, T0)).ok
    got = await store.get_by_rid(rec.rid)
    assert got is not None and got.relay == ""
    (only,) = await store.ledger(DAY, DAY)
    assert only.relay == "" and only.tasks_created == 1


async def test_a_sqlite_file_from_before_relays_is_upgraded(tmp_path: Path) -> None:
    """Tasks and ledger rows of an older file: the tasks read as relay "", the ledger keeps
    its rows under relay "" and books new ones per relay."""
    from gateway.store.sqlite import SQLiteStore

    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE ledger (day TEXT NOT NULL, tenant TEXT NOT NULL, key_id TEXT NOT NULL DEFAULT '',"
        " tasks_created INTEGER NOT NULL DEFAULT 0, tasks_succeeded INTEGER NOT NULL DEFAULT 0,"
        " tasks_failed INTEGER NOT NULL DEFAULT 0, credits_charged INTEGER NOT NULL DEFAULT 0,"
        " credits_refunded INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (day, tenant, key_id)) WITHOUT ROWID;"
        f"INSERT INTO ledger VALUES ('{DAY}', '{TENANT}', 'key_a', 3, 1, 0, 30, 0);"
    )
    old.close()
    s = SQLiteStore(str(path))
    await s.open()
    try:
        assert await s.ledger(DAY, DAY) == [row("", tasks_created=3, tasks_succeeded=1, credits_charged=30)]
        await admitted(s, "b")
        assert await s.ledger(DAY, DAY) == [
            row("", tasks_created=3, tasks_succeeded=1, credits_charged=30),
            row("b", tasks_created=1, credits_charged=PRICE),
        ]
    finally:
        await s.close()
    again = SQLiteStore(str(path))  # a second open finds it upgraded
    await again.open()
    try:
        assert len(await again.ledger(DAY, DAY)) == 2
    finally:
        await again.close()


async def test_a_redis_record_and_ledger_field_from_before_relays(store: Store, store_spec: StoreSpec) -> None:
    """A Redis ledger field "tenant<TAB>key<TAB>counter" (no relay) reads as relay ""."""
    if store_spec.kind != "redis":
        return
    from gateway.store.redis import RedisStore

    assert isinstance(store, RedisStore)
    await store._r.execute("HSET", store._k("led", DAY), f"{TENANT}\tkey_a\ttasks_created", "4")
    await admitted(store, "a")
    assert await store.ledger(DAY, DAY) == [
        row("", tasks_created=4),
        row("a", tasks_created=1, credits_charged=PRICE),
    ]


async def key_admitted(store: Store, relay: str) -> TaskRecord:
    """A create by an API key with its own limits (contract §15), reserved at `relay`."""
    rec = reservation()
    rec.relay, rec.key_id = relay, "key_a"
    key = KeyLimits("key_a", Limits(max_active_tasks=1, tasks_per_day=5))
    charge = Charge(PRICE, DAY, month_key(T0))
    assert (await store.admit_create(TENANT, Limits(max_active_tasks=5), charge, rec, T0, None, key)).ok
    return rec


async def test_a_key_limited_create_failed_over_then_lost_releases_the_key_as_the_tenant(store: Store) -> None:
    """The three paths merged by hand (failover, key limits, the lost-reservation sweep):
    a key-limited reservation moved to relay b, marked UNKNOWN by the sweep, then settled
    as not created, gives back the key's quota with the tenant's and leaves no ledger trace;
    one moved and left UNKNOWN until its timeout frees the key's slot with the tenant's."""
    rec = await key_admitted(store, "a")
    assert await store.assign_relay(rec.rid, "b", 1, T0 + 1)
    (lost,) = await store.expire_tasks(T0 + 40, 3600, 300, in_flight=35)
    assert (lost.rid, lost.status, lost.relay, lost.key_limited) == (rec.rid, "UNKNOWN", "b", True)
    assert not await store.assign_relay(rec.rid, "a", 0, T0 + 41)  # no longer movable
    assert await store.settle_not_created(rec.rid, T0 + 42)
    assert await store.usage(TENANT, T0 + 42) == Usage()
    assert await store.key_usage("key_a", T0 + 42) == Usage()
    assert await store.ledger(DAY, DAY) == []
    # the key's one slot is free again: the next create is admitted, moved, lost, timed out
    kept = await key_admitted(store, "a")
    assert await store.assign_relay(kept.rid, "b", 0, T0 + 1)
    await store.expire_tasks(T0 + 40, 3600, 300, in_flight=35)
    (expired,) = await store.expire_tasks(T0 + 301, 3600, 300, in_flight=35)
    assert (expired.rid, expired.active) == (kept.rid, False)
    charged = Usage(0, 1, PRICE, PRICE, 1)  # the charge stands (the relay may bill it)
    assert await store.usage(TENANT, T0 + 301) == charged
    assert await store.key_usage("key_a", T0 + 301) == charged
    assert await store.ledger(DAY, DAY) == [row("b", tasks_created=1, credits_charged=PRICE)]
