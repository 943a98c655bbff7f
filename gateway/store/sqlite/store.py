"""The embedded store: one SQLite file in WAL mode, shared by every worker process.

Operations run directly on the event loop: a thread hop (aiosqlite) costs more than the
query itself (docs/benchmarks.md). Writes go through group commit (group_commit.py): the
operations of one event-loop turn share one `BEGIN IMMEDIATE` transaction, each inside a
SAVEPOINT of its own, and each caller resumes only after the shared COMMIT, so an answer
never gets ahead of its data. `BEGIN IMMEDIATE` takes the write lock before reading, so
check-then-increment cannot race, in this process or another. The quota and lifecycle
decisions are rules.py's, run inside that transaction.

Two connections: the writer runs every statement inside a group's transaction, so the only
lock it can meet is at `BEGIN`, which waits on the event loop (busy timeout 0); the reader
answers reads outside a transaction (they see committed data only) and keeps SQLite's busy
timeout for the one lock a WAL read can meet, another process recovering the WAL.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import orjson

from gateway.store import directory, rules
from gateway.store.base import (
    CONFIG_KEY_PREFIX,
    DEAD_EVENT_RETENTION,
    LAST_ERROR_MAX,
    LEDGER_COUNTERS,
    ORPHAN_KEEP_SECONDS,
    SUBMITTING,
    UNKNOWN,
    Admission,
    AuditEntry,
    Charge,
    DirectorySnapshot,
    IdempotencyResult,
    KeyLimits,
    KeyRecord,
    LedgerRow,
    Limits,
    OutboxEntry,
    Store,
    StoredResponse,
    TaskRecord,
    TenantRecord,
    UpdateResult,
    Usage,
    WebhookEvent,
    new_event_id,
)
from gateway.store.rules import Booking, Quota
from gateway.store.sqlite.group_commit import OUTAGE, GroupCommit
from gateway.store.sqlite.schema import SCHEMA, checkpoint, connect, migrate

TERMINAL_SQL = "('SUCCEEDED', 'FAILED', 'CANCELLED')"
# (table, key column) of a tenant's quota row and of an API key's own (contract §15)
TENANT_QUOTA = ("quota", "tenant")
KEY_QUOTA = ("key_quota", "key_id")
OUTBOX_COLUMNS = (
    "w.event_id, w.tenant, w.rid, t.task_id, w.seq, w.state, w.attempts, w.next_at, w.last_error, w.created_at"
)


class SQLiteStore(Store):
    def __init__(self, path: str):
        self.path = path
        self._db: sqlite3.Connection | None = None  # the writer
        self._reader: sqlite3.Connection | None = None
        self._write: GroupCommit | None = None

    # lifecycle ----------------------------------------------------------------------
    async def open(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        db = connect(self.path)
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(SCHEMA)  # with the busy timeout: workers starting together queue here
        migrate(db)
        db.execute("PRAGMA busy_timeout=0")
        self._db = db
        self._reader = db if self.path == ":memory:" else connect(self.path)
        self._write = GroupCommit(db)

    async def close(self) -> None:
        if self._db is not None:
            if self._write is not None:
                self._write.flush()
            if self._reader is not None and self._reader is not self._db:
                self._reader.close()
            self._db.close()
            self._db = self._reader = self._write = None

    async def ping(self) -> None:
        """An empty write group: it answers only once the write lock could be taken."""
        async with self._tx:
            pass

    async def maintain(self, now: float) -> None:
        async with self._tx:
            # a pending key bound to an admitted create outlives its lease (idem_begin)
            self.db.execute(
                "DELETE FROM idempotency WHERE expires_at <= ? AND (state != 'pending' OR rid = '' OR expires_at <= ?)",
                (now, now - ORPHAN_KEEP_SECONDS),
            )
            self.db.execute("DELETE FROM assets WHERE expires_at <= ?", (now,))
            self.db.execute("DELETE FROM webhooks WHERE state = 'dead' AND next_at <= ?", (now - DEAD_EVENT_RETENTION,))
            self.db.execute("DELETE FROM ledger WHERE day < ?", (rules.ledger_cutoff(now),))
        await asyncio.to_thread(checkpoint, self.path)

    @property
    def db(self) -> sqlite3.Connection:
        """The writer: only inside `async with self._tx:`."""
        if self._db is None:
            raise RuntimeError("store is not open")
        return self._db

    @property
    def reader(self) -> sqlite3.Connection:
        """For reads outside a write operation."""
        if self._reader is None:
            raise RuntimeError("store is not open")
        return self._reader

    @property
    def _tx(self) -> GroupCommit:
        """`async with self._tx:` around one operation's writes (no await inside)."""
        if self._write is None:
            raise RuntimeError("store is not open")
        return self._write

    async def secret(self, name: str, candidate: str) -> str:
        async with self._tx:
            self.db.execute("INSERT OR IGNORE INTO secrets (name, value) VALUES (?, ?)", (name, candidate))
            row = self.db.execute("SELECT value FROM secrets WHERE name = ?", (name,)).fetchone()
        return str(row["value"])

    # admission ----------------------------------------------------------------------
    async def take_request(self, tenant_id: str, limits: Limits, now: float, key: KeyLimits | None = None) -> Admission:
        cap = limits.requests_per_minute
        if key is not None and key.limits.requests_per_minute is not None:
            async with self._tx:
                q, kq = self._quota(tenant_id, now), self._quota(key.key_id, now, KEY_QUOTA)
                admission = rules.take_requests(q, limits, now, _with_limits(kq, key))
                if admission.ok:
                    self._save_quota(tenant_id, q)
                    self._save_quota(key.key_id, kq, KEY_QUOTA)
            return admission
        if cap is None:
            return Admission(ok=True)
        async with self._tx:
            q = self._quota(tenant_id, now)
            level, ok = rules.bucket_take(q.rpm_tokens, q.rpm_ts, cap, now)
            if ok:
                self.db.execute(
                    "UPDATE quota SET rpm_tokens = ?, rpm_ts = ? WHERE tenant = ?",
                    (level, max(q.rpm_ts, now), tenant_id),
                )
        return rules.request_admission(ok, level, cap)

    async def admit_create(
        self,
        tenant_id: str,
        limits: Limits,
        charge: Charge,
        reservation: TaskRecord,
        now: float,
        idempotency_key: str | None = None,
        key: KeyLimits | None = None,
    ) -> Admission:
        async with self._tx:
            q = self._quota(tenant_id, now)
            kq = self._quota(key.key_id, now, KEY_QUOTA) if key is not None else None
            refusal, rate = rules.check_create(q, limits, charge.credits, now, _with_limits(kq, key))
            if refusal is not None:
                refusal.rate = rate
                return refusal
            rules.charge(q, charge.credits)
            self._save_quota(tenant_id, q)
            if kq is not None and key is not None:
                rules.charge(kq, charge.credits)
                self._save_quota(key.key_id, kq, KEY_QUOTA)
                reservation.key_id, reservation.key_limited = key.key_id, True
            reservation.charge_day, reservation.charge_month, reservation.credits = q.day, q.month, charge.credits
            self._insert_task(reservation)
            self._book(rules.book_charge(reservation))
            if idempotency_key is not None:
                self.db.execute(
                    "UPDATE idempotency SET rid = ? WHERE tenant = ? AND key = ? AND state = 'pending'",
                    (reservation.rid, tenant_id, idempotency_key),
                )
        return Admission(True, rate=rate)

    async def settle_not_created(self, rid: str, now: float) -> bool:
        async with self._tx:
            rec = self._get(rid)
            if rec is None or rec.status not in (SUBMITTING, UNKNOWN) or rec.settled:
                return False
            for quota_id, where in self._quotas_of(rec):
                q = self._quota(quota_id, now, where)
                rules.uncharge(q, rec)
                self._save_quota(quota_id, q, where)
            self.db.execute("DELETE FROM tasks WHERE rid = ?", (rid,))
            self._book(rules.book_not_created(rec))
        return True

    async def assign_relay(self, rid: str, relay: str, key_index: int, now: float) -> bool:
        async with self._tx:
            rec = self._get(rid)
            if rec is None or rec.status != SUBMITTING:
                return False
            for booking in rules.book_relay_move(rec, relay):
                self._book(booking)
            self.db.execute("UPDATE tasks SET relay = ?, key_index = ? WHERE rid = ?", (relay, key_index, rid))
        return True

    async def active_by_relay(self) -> dict[str, int]:
        with OUTAGE:
            rows = self.reader.execute("SELECT relay, COUNT(*) FROM tasks WHERE active = 1 GROUP BY relay").fetchall()
        return {r[0] or "": r[1] for r in rows}

    async def mark_unknown(self, rid: str, now: float) -> None:
        async with self._tx:
            self.db.execute(
                "UPDATE tasks SET status = ?, updated_at = ? WHERE rid = ? AND status = ?",
                (UNKNOWN, now, rid, SUBMITTING),
            )

    async def apply_update(
        self,
        rid: str,
        tenant_id: str,
        task: dict[str, Any],
        now: float,
        *,
        refund_failed: bool,
        adopt: TaskRecord | None = None,
    ) -> UpdateResult:
        async with self._tx:
            rec = self._get(rid)
            adopted = False
            if rec is not None and rec.tenant_id != tenant_id:
                return UpdateResult(None)  # a token of one tenant never touches another's task
            if rec is None:
                if adopt is None:
                    return UpdateResult(None)
                rec = self._adopt(adopt, now)
                adopted = True
            result = rules.decide_update(rec, task, now, refund_failed)
            result.adopted = adopted
            if not result.applied:
                return result
            if result.finished:
                for quota_id, where in self._quotas_of(rec):
                    q = self._quota(quota_id, now, where)
                    if result.freed_slot:
                        rules.free_slot(q)
                    if result.refunded_credits:
                        rules.refund_credits(q, rec)
                    self._save_quota(quota_id, q, where)
                for booking in rules.book_update(rec, result, now):
                    self._book(booking)
            self._update_task(rec)
            if result.notify:
                result.event_id = self._enqueue_event(rec, now)
        return result

    # reads --------------------------------------------------------------------------
    async def get_by_task_id(self, tenant_id: str, task_id: str) -> TaskRecord | None:
        with OUTAGE:
            row = self.reader.execute(
                "SELECT * FROM tasks WHERE task_id = ? AND tenant = ? AND deleted = 0", (task_id, tenant_id)
            ).fetchone()
        return _record(row) if row else None

    async def get_by_rid(self, rid: str) -> TaskRecord | None:
        with OUTAGE:
            return self._get(rid, self.reader)

    async def list_tasks(
        self, tenant_id: str, *, limit: int, after: str | None = None, status: str | None = None, order: str = "desc"
    ) -> tuple[list[TaskRecord], bool]:
        desc = order != "asc"
        sql = ["SELECT * FROM tasks WHERE tenant = ? AND deleted = 0 AND task_id IS NOT NULL"]
        args: list[Any] = [tenant_id]
        if status:
            sql.append("AND status = ?")
            args.append(status)
        with OUTAGE:
            if after:
                cursor = self.reader.execute(
                    "SELECT created_at, rid FROM tasks WHERE task_id = ? AND tenant = ?", (after, tenant_id)
                ).fetchone()
                if cursor is None:
                    return [], False
                cmp = "<" if desc else ">"
                sql.append(f"AND (created_at {cmp} ? OR (created_at = ? AND rid {cmp} ?))")
                args += [cursor["created_at"], cursor["created_at"], cursor["rid"]]
            direction = "DESC" if desc else "ASC"
            sql.append(f"ORDER BY created_at {direction}, rid {direction} LIMIT ?")
            args.append(limit + 1)
            rows = self.reader.execute(" ".join(sql), args).fetchall()
        return [_record(r) for r in rows[:limit]], len(rows) > limit

    async def hide_task(self, tenant_id: str, task_id: str) -> bool:
        async with self._tx:
            cur = self.db.execute(
                "UPDATE tasks SET deleted = 1 WHERE task_id = ? AND tenant = ? AND deleted = 0", (task_id, tenant_id)
            )
        return cur.rowcount == 1

    async def usage(self, tenant_id: str, now: float) -> Usage:
        async with self._tx:
            q = self._quota(tenant_id, now)
        return Usage(q.active, q.day_tasks, q.day_credits, q.month_credits, q.month_tasks)

    async def key_usage(self, key_id: str, now: float) -> Usage:
        async with self._tx:
            q = self._quota(key_id, now, KEY_QUOTA)
        return Usage(q.active, q.day_tasks, q.day_credits, q.month_credits, q.month_tasks)

    async def ledger(
        self, from_day: str, to_day: str, tenant: str | None = None, key_id: str | None = None
    ) -> list[LedgerRow]:
        sql = ["SELECT * FROM ledger WHERE day >= ? AND day <= ?"]
        args: list[Any] = [from_day, to_day]
        if tenant is not None:
            sql.append("AND tenant = ?")
            args.append(tenant)
        if key_id is not None:
            sql.append("AND key_id = ?")
            args.append(key_id)
        sql.append("ORDER BY day, tenant, key_id, relay")
        with OUTAGE:
            rows = self.reader.execute(" ".join(sql), args).fetchall()
        return [
            LedgerRow(
                r["day"], r["tenant"], r["key_id"] or None, relay=r["relay"], **{c: r[c] for c in LEDGER_COUNTERS}
            )
            for r in rows
        ]

    async def active_by_tenant(self) -> dict[str, int]:
        with OUTAGE:
            return {r["tenant"]: r["active"] for r in self.reader.execute("SELECT tenant, active FROM quota")}

    async def webhook_pending(self) -> int:
        with OUTAGE:
            return int(self.reader.execute("SELECT COUNT(*) FROM webhooks WHERE state = 'pending'").fetchone()[0])

    # polling and timeouts -----------------------------------------------------------
    async def claim_poll(self, rid: str, now: float, interval: float) -> bool:
        async with self._tx:
            cur = self.db.execute(
                "UPDATE tasks SET next_poll_at = ? WHERE rid = ? AND next_poll_at <= ?"
                f" AND status NOT IN {TERMINAL_SQL}",
                (now + interval, rid, now),
            )
        return cur.rowcount == 1

    async def claim_due_polls(
        self, now: float, interval: float, limit: int, timed_out_interval: float, give_up_after: float
    ) -> list[TaskRecord]:
        async with self._tx:
            rows = self.db.execute(
                f"SELECT * FROM tasks WHERE status NOT IN {TERMINAL_SQL} AND task_id IS NOT NULL"
                " AND next_poll_at <= ? AND created_at > ? ORDER BY next_poll_at LIMIT ?",
                (now, now - give_up_after, limit),
            ).fetchall()
            records = [_record(r) for r in rows]
            for rec in records:
                rec.next_poll_at = now + (timed_out_interval if rec.timed_out else interval)
                self.db.execute("UPDATE tasks SET next_poll_at = ? WHERE rid = ?", (rec.next_poll_at, rec.rid))
        return records

    async def expire_tasks(
        self, now: float, timeout: float, unknown_timeout: float, in_flight: float | None = None
    ) -> list[TaskRecord]:
        async with self._tx:
            lost = self._mark_lost_in_flight(now, in_flight) if in_flight is not None else {}
            rows = self.db.execute(
                f"SELECT * FROM tasks WHERE active = 1 AND status NOT IN {TERMINAL_SQL} AND created_at <= ?"
                " UNION SELECT * FROM tasks WHERE active = 1 AND status = 'UNKNOWN' AND created_at <= ?",
                (now - timeout, now - unknown_timeout),
            ).fetchall()
            records = [_record(r) for r in rows]
            for rec in records:
                rec.active, rec.timed_out = False, True
                self.db.execute(
                    "UPDATE tasks SET active = 0, timed_out = 1, updated_at = ? WHERE rid = ?", (now, rec.rid)
                )
                if rec.key_limited and rec.key_id:  # its key's slot too (contract §15)
                    self.db.execute("UPDATE key_quota SET active = MAX(0, active - 1) WHERE key_id = ?", (rec.key_id,))
                self.db.execute("UPDATE quota SET active = MAX(0, active - 1) WHERE tenant = ?", (rec.tenant_id,))
                lost.pop(rec.rid, None)
        return records + list(lost.values())

    def _mark_lost_in_flight(self, now: float, in_flight: float) -> dict[str, TaskRecord]:
        """SUBMITTING -> UNKNOWN for the reservations whose gateway died mid-create
        (rules.lost_in_flight), inside expire_tasks' transaction; returns them by rid."""
        rows = self.db.execute(
            "SELECT * FROM tasks WHERE active = 1 AND status = 'SUBMITTING' AND created_at <= ?", (now - in_flight,)
        ).fetchall()
        lost: dict[str, TaskRecord] = {}
        for rec in (_record(r) for r in rows):
            if rules.lost_in_flight(rec, now, in_flight):
                rec.status, rec.updated_at = UNKNOWN, now
                self.db.execute("UPDATE tasks SET status = ?, updated_at = ? WHERE rid = ?", (UNKNOWN, now, rec.rid))
                lost[rec.rid] = rec
        return lost

    # webhook outbox -----------------------------------------------------------------
    async def claim_webhooks(self, now: float, limit: int, lease: float) -> list[WebhookEvent]:
        # The head of each task's queue is its lowest remaining seq, pending or dead:
        # a dead head holds its task's later events back until redelivered or dropped.
        async with self._tx:
            rows = self.db.execute(
                "SELECT * FROM webhooks w WHERE state = 'pending' AND next_at <= ?"
                " AND seq = (SELECT MIN(seq) FROM webhooks v WHERE v.rid = w.rid)"
                " ORDER BY next_at LIMIT ?",
                (now, limit),
            ).fetchall()
            for r in rows:
                self.db.execute("UPDATE webhooks SET next_at = ? WHERE event_id = ?", (now + lease, r["event_id"]))
        return [
            WebhookEvent(
                r["event_id"],
                r["rid"],
                r["tenant"],
                r["seq"],
                r["url"],
                bytes(r["body"]),
                r["attempts"],
                r["created_at"],
            )
            for r in rows
        ]

    async def finish_webhook(
        self,
        event_id: str,
        *,
        delivered: bool,
        attempts: int,
        next_at: float | None,
        now: float,
        error: str | None = None,
    ) -> None:
        error = error[:LAST_ERROR_MAX] if error is not None else None
        async with self._tx:
            if delivered:
                self.db.execute("DELETE FROM webhooks WHERE event_id = ?", (event_id,))
            elif next_at is None:  # dead: next_at keeps the time it died (retention, maintain)
                self.db.execute(
                    "UPDATE webhooks SET state = 'dead', attempts = ?, next_at = ?, last_error = ?"
                    " WHERE event_id = ? AND state = 'pending'",
                    (attempts, now, error, event_id),
                )
            else:
                self.db.execute(
                    "UPDATE webhooks SET attempts = ?, next_at = ?, last_error = ?"
                    " WHERE event_id = ? AND state = 'pending'",
                    (attempts, next_at, error, event_id),
                )

    async def list_webhooks(
        self, *, limit: int, after: str | None = None, state: str | None = None, tenant: str | None = None
    ) -> tuple[list[OutboxEntry], bool]:
        sql = [f"SELECT {OUTBOX_COLUMNS} FROM webhooks w LEFT JOIN tasks t ON t.rid = w.rid WHERE 1 = 1"]
        args = _equal_filters(sql, {"w.state": state, "w.tenant": tenant})
        if after:
            sql.append("AND w.event_id < ?")
            args.append(after)
        sql.append("ORDER BY w.event_id DESC LIMIT ?")
        args.append(max(0, limit) + 1)
        with OUTAGE:
            rows = self.reader.execute(" ".join(sql), args).fetchall()
        return [_outbox_entry(r) for r in rows[:limit]], len(rows) > limit

    async def redeliver_webhook(self, event_id: str, now: float, audit: AuditEntry) -> tuple[OutboxEntry, bool] | None:
        async with self._tx:
            entry = self._outbox_entry(event_id)
            if entry is None or entry.state != "dead":
                return (entry, False) if entry is not None else None
            self.db.execute(
                "UPDATE webhooks SET state = 'pending', attempts = 0, next_at = ?, last_error = NULL"
                " WHERE event_id = ?",
                (now, event_id),
            )
            audit.tenant = entry.tenant_id
            self._append_audit(audit)
            entry.state, entry.attempts, entry.next_at, entry.last_error = "pending", 0, now, None
        return entry, True

    # uploaded assets ----------------------------------------------------------------
    async def put_asset(self, asset_id: str, content_type: str, data: bytes, expires_at: float, now: float) -> None:
        async with self._tx:
            self.db.execute(
                "INSERT OR REPLACE INTO assets (asset_id, content_type, data, expires_at) VALUES (?, ?, ?, ?)",
                (asset_id, content_type, data, expires_at),
            )

    async def get_asset(self, asset_id: str, now: float) -> tuple[str, bytes] | None:
        with OUTAGE:
            row = self.reader.execute(
                "SELECT content_type, data FROM assets WHERE asset_id = ? AND expires_at > ?", (asset_id, now)
            ).fetchone()
        return (row["content_type"], bytes(row["data"])) if row else None

    async def delete_asset(self, asset_id: str) -> None:
        async with self._tx:
            self.db.execute("DELETE FROM assets WHERE asset_id = ?", (asset_id,))

    # idempotency --------------------------------------------------------------------
    async def idem_begin(
        self, tenant_id: str, key: str, fingerprint: str, now: float, lease: float
    ) -> IdempotencyResult:
        async with self._tx:
            row = self.db.execute("SELECT * FROM idempotency WHERE tenant = ? AND key = ?", (tenant_id, key)).fetchone()
            orphan = row is not None and rules.orphaned_idempotency(row["state"], row["rid"], row["expires_at"], now)
            if orphan and row["fingerprint"] == fingerprint:
                # its holder was admitted, then vanished: bind the key to that reservation
                self.db.execute(
                    "UPDATE idempotency SET state = 'unknown', expires_at = ? WHERE tenant = ? AND key = ?",
                    (row["expires_at"] + ORPHAN_KEEP_SECONDS, tenant_id, key),
                )
                return IdempotencyResult("unknown", rid=row["rid"])
            if row is not None and row["expires_at"] <= now and not orphan:
                self.db.execute("DELETE FROM idempotency WHERE tenant = ? AND key = ?", (tenant_id, key))
                row = None
            if row is None:
                self.db.execute(
                    "INSERT INTO idempotency (tenant, key, fingerprint, state, expires_at)"
                    " VALUES (?, ?, ?, 'pending', ?)",
                    (tenant_id, key, fingerprint, now + lease),
                )
                return IdempotencyResult("new")
        if row["fingerprint"] != fingerprint:
            return IdempotencyResult("conflict")
        if row["state"] == "pending":
            return IdempotencyResult("pending")
        if row["state"] == "unknown":
            return IdempotencyResult("unknown", rid=row["rid"])
        return IdempotencyResult(
            "replay", StoredResponse(row["status"], orjson.loads(row["headers"]), bytes(row["body"]))
        )

    async def idem_finish(
        self, tenant_id: str, key: str, response: StoredResponse | None, now: float, ttl: float
    ) -> None:
        async with self._tx:
            if response is None:
                self.db.execute(
                    "DELETE FROM idempotency WHERE tenant = ? AND key = ? AND state = 'pending'", (tenant_id, key)
                )
            else:
                self.db.execute(
                    "UPDATE idempotency SET state = 'done', status = ?, headers = ?, body = ?, expires_at = ?"
                    " WHERE tenant = ? AND key = ?",
                    (
                        response.status,
                        orjson.dumps(response.headers).decode(),
                        response.body,
                        now + ttl,
                        tenant_id,
                        key,
                    ),
                )

    async def idem_bind(self, tenant_id: str, key: str, rid: str, now: float, ttl: float) -> None:
        async with self._tx:
            self.db.execute(
                "UPDATE idempotency SET state = 'unknown', rid = ?, expires_at = ?"
                " WHERE tenant = ? AND key = ? AND state = 'pending'",
                (rid, now + ttl, tenant_id, key),
            )

    # the directory: tenants, keys, audit --------------------------------------------
    async def directory_version(self) -> int:
        with OUTAGE:
            return int(self.reader.execute("SELECT version FROM directory WHERE id = 1").fetchone()[0])

    async def load_directory(self) -> DirectorySnapshot:
        """One read transaction on the reader: the version and the rows it counts."""
        with OUTAGE:
            db = self.reader
            own = not db.in_transaction  # ":memory:" shares the writer, maybe inside a group
            if own:
                db.execute("BEGIN")
            try:
                version = int(db.execute("SELECT version FROM directory WHERE id = 1").fetchone()[0])
                tenants = [_tenant(r) for r in db.execute("SELECT data FROM tenants ORDER BY id")]
                keys = [_key(r) for r in db.execute("SELECT data FROM api_keys ORDER BY created_at DESC, id DESC")]
            finally:
                if own:
                    db.execute("COMMIT")
        return DirectorySnapshot(version, tenants, keys)

    async def create_tenant(self, tenant: TenantRecord, audit: AuditEntry) -> bool:
        data = orjson.dumps(directory.tenant_fields(tenant)).decode()
        async with self._tx:
            cur = self.db.execute("INSERT OR IGNORE INTO tenants (id, data) VALUES (?, ?)", (tenant.id, data))
            if cur.rowcount != 1:
                return False
            self._directory_changed(audit)
        return True

    async def update_tenant(
        self, tenant_id: str, changes: dict[str, Any], now: float, audit: AuditEntry
    ) -> TenantRecord | None:
        put, drop = directory.tenant_changes(changes, now)
        async with self._tx:
            fields = self._update_fields("tenants", tenant_id, put, drop)
            if fields is None:
                return None
            self._directory_changed(audit)
        return directory.tenant_from_fields(fields)

    async def rotate_webhook_secret(
        self, tenant_id: str, new_secret: str, grace_until: float | None, now: float, audit: AuditEntry
    ) -> TenantRecord | None:
        put, _ = directory.tenant_changes({"webhook_secret": new_secret}, now)
        async with self._tx:
            fields = self._rotate("tenants", tenant_id, directory.TENANT_SECRET, put, grace_until, now)
            if fields is None:
                return None
            self._directory_changed(audit)
        return directory.tenant_from_fields(fields)

    async def get_tenant(self, tenant_id: str) -> TenantRecord | None:
        with OUTAGE:
            row = self.reader.execute("SELECT data FROM tenants WHERE id = ?", (tenant_id,)).fetchone()
        return _tenant(row) if row else None

    async def create_key(self, key: KeyRecord, audit: AuditEntry) -> None:
        data = orjson.dumps(directory.key_fields(key)).decode()
        async with self._tx:
            self.db.execute(
                "INSERT INTO api_keys (id, tenant, created_at, data) VALUES (?, ?, ?, ?)",
                (key.id, key.tenant_id, key.created_at, data),
            )
            self._directory_changed(audit)

    async def update_key(self, key_id: str, changes: dict[str, Any], audit: AuditEntry) -> KeyRecord | None:
        put, drop = directory.key_changes(changes)
        async with self._tx:
            fields = self._update_fields("api_keys", key_id, put, drop)
            if fields is None:
                return None
            self._directory_changed(audit)
        return directory.key_from_fields(fields)

    async def rotate_key(
        self, key_id: str, new_hash: str, new_prefix: str, grace_until: float | None, now: float, audit: AuditEntry
    ) -> KeyRecord | None:
        put, _ = directory.key_changes({"secret_hash": new_hash, "prefix": new_prefix})
        async with self._tx:
            row = self.db.execute("SELECT data FROM api_keys WHERE id = ?", (key_id,)).fetchone()
            if row is None:
                return None
            if "revoked_at" in orjson.loads(row["data"]):
                return _key(row)
            fields = self._rotate("api_keys", key_id, directory.KEY_SECRET, put, grace_until, now)
            assert fields is not None  # the row was just read in this transaction
            self._directory_changed(audit)
        return directory.key_from_fields(fields)

    async def revoke_key(self, key_id: str, now: float, audit: AuditEntry) -> KeyRecord | None:
        put, _ = directory.key_changes({"revoked_at": now})
        async with self._tx:
            row = self.db.execute("SELECT data FROM api_keys WHERE id = ?", (key_id,)).fetchone()
            if row is None:
                return None
            if "revoked_at" in orjson.loads(row["data"]):
                return _key(row)
            fields = self._update_fields("api_keys", key_id, put, [])
            assert fields is not None  # the row was just read in this transaction
            self._directory_changed(audit)
        return directory.key_from_fields(fields)

    async def get_key(self, key_id: str) -> KeyRecord | None:
        with OUTAGE:
            row = self.reader.execute("SELECT data FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        return _key(row) if row else None

    async def list_keys(self, tenant_id: str) -> list[KeyRecord]:
        with OUTAGE:
            rows = self.reader.execute(
                "SELECT data FROM api_keys WHERE tenant = ? ORDER BY created_at DESC, id DESC", (tenant_id,)
            ).fetchall()
        return [_key(r) for r in rows]

    async def touch_keys(self, last_used: dict[str, float]) -> None:
        if not last_used:
            return
        async with self._tx:
            for key_id, used_at in last_used.items():
                if key_id.startswith(CONFIG_KEY_PREFIX):
                    self.db.execute(
                        "INSERT INTO config_key_uses (id, last_used_at) VALUES (?, ?) ON CONFLICT (id) DO UPDATE"
                        " SET last_used_at = excluded.last_used_at WHERE excluded.last_used_at > last_used_at",
                        (key_id, used_at),
                    )
                    continue
                row = self.db.execute("SELECT data FROM api_keys WHERE id = ?", (key_id,)).fetchone()
                if row is None:
                    continue
                fields = orjson.loads(row["data"])
                later = directory.later_use(fields, used_at)
                if later is not None:
                    fields["last_used_at"] = later
                    self.db.execute(
                        "UPDATE api_keys SET data = ? WHERE id = ?", (orjson.dumps(fields).decode(), key_id)
                    )

    async def config_key_uses(self, key_ids: list[str]) -> dict[str, float]:
        if not key_ids:
            return {}
        marks = ",".join("?" * len(key_ids))
        with OUTAGE:
            rows = self.reader.execute(
                f"SELECT id, last_used_at FROM config_key_uses WHERE id IN ({marks})", key_ids
            ).fetchall()
        return {r["id"]: float(r["last_used_at"]) for r in rows}

    async def append_audit(self, entry: AuditEntry) -> bool:
        async with self._tx:
            if self.db.execute("SELECT 1 FROM audit WHERE id = ?", (entry.id,)).fetchone() is not None:
                return False
            self._append_audit(entry)
        return True

    async def list_audit(
        self, *, limit: int, after: str | None = None, tenant: str | None = None, action: str | None = None
    ) -> tuple[list[AuditEntry], bool]:
        sql = ["SELECT data FROM audit WHERE 1 = 1"]
        args = _equal_filters(sql, {"tenant": tenant, "action": action})
        with OUTAGE:
            if after:
                cursor = self.reader.execute("SELECT time FROM audit WHERE id = ?", (after,)).fetchone()
                if cursor is None:
                    return [], False
                sql.append("AND (time < ? OR (time = ? AND id < ?))")
                args += [cursor["time"], cursor["time"], after]
            sql.append("ORDER BY time DESC, id DESC LIMIT ?")
            args.append(max(0, limit) + 1)
            rows = self.reader.execute(" ".join(sql), args).fetchall()
        return [directory.audit_from_json(r["data"]) for r in rows[:limit]], len(rows) > limit

    async def prune_audit(self, before: float) -> int:
        async with self._tx:
            cur = self.db.execute("DELETE FROM audit WHERE time < ?", (before,))
        return int(cur.rowcount)

    # internals (each runs inside the caller's transaction) --------------------------
    def _quota(self, quota_id: str, now: float, where: tuple[str, str] = TENANT_QUOTA) -> Quota:
        """A quota row (a tenant's, or with KEY_QUOTA a key's), created when new, rolled to `now`."""
        table, column = where
        row = self.db.execute(f"SELECT * FROM {table} WHERE {column} = ?", (quota_id,)).fetchone()
        if row is None:
            self.db.execute(f"INSERT INTO {table} ({column}) VALUES (?)", (quota_id,))
            row = self.db.execute(f"SELECT * FROM {table} WHERE {column} = ?", (quota_id,)).fetchone()
        q = Quota(
            row["rpm_tokens"], row["rpm_ts"], row["tpm_tokens"], row["tpm_ts"], row["active"],
            row["day"], row["day_tasks"], row["day_credits"], row["month"], row["month_credits"],
            row["month_tasks"],
        )  # fmt: skip
        q.roll(now)
        return q

    def _save_quota(self, quota_id: str, q: Quota, where: tuple[str, str] = TENANT_QUOTA) -> None:
        table, column = where
        self.db.execute(
            f"UPDATE {table} SET rpm_tokens = ?, rpm_ts = ?, tpm_tokens = ?, tpm_ts = ?, active = ?, day = ?,"
            f" day_tasks = ?, day_credits = ?, month = ?, month_credits = ?, month_tasks = ? WHERE {column} = ?",
            (
                q.rpm_tokens,
                q.rpm_ts,
                q.tpm_tokens,
                q.tpm_ts,
                q.active,
                q.day,
                q.day_tasks,
                q.day_credits,
                q.month,
                q.month_credits,
                q.month_tasks,
                quota_id,
            ),
        )

    @staticmethod
    def _quotas_of(rec: TaskRecord) -> list[tuple[str, tuple[str, str]]]:
        """The quotas a task was charged to, which its releases give back to: its tenant's,
        and its key's when it was admitted under key limits."""
        if rec.key_limited and rec.key_id:
            return [(rec.tenant_id, TENANT_QUOTA), (rec.key_id, KEY_QUOTA)]
        return [(rec.tenant_id, TENANT_QUOTA)]

    def _update_fields(self, table: str, row_id: str, put: dict[str, str], drop: list[str]) -> dict[str, str] | None:
        """Set and delete fields of a directory record's map; None when there is no such row."""
        row = self.db.execute(f"SELECT data FROM {table} WHERE id = ?", (row_id,)).fetchone()
        if row is None:
            return None
        fields = directory.merged(orjson.loads(row["data"]), put, drop)
        self.db.execute(f"UPDATE {table} SET data = ? WHERE id = ?", (orjson.dumps(fields).decode(), row_id))
        return fields

    def _rotate(
        self,
        table: str,
        row_id: str,
        slots: tuple[str, str, str, str],
        put: dict[str, str],
        grace_until: float | None,
        now: float,
    ) -> dict[str, str] | None:
        """A rotation of a directory record's secret, from its map as stored in this
        transaction (directory.rotated); None when there is no such row."""
        row = self.db.execute(f"SELECT data FROM {table} WHERE id = ?", (row_id,)).fetchone()
        if row is None:
            return None
        stored = orjson.loads(row["data"])
        put, drop = directory.rotated(stored, slots, put, directory.grace_field(grace_until, now), now)
        return self._update_fields(table, row_id, put, drop)

    def _directory_changed(self, audit: AuditEntry) -> None:
        """The version bump and audit entry every tenant or key change makes with it."""
        self.db.execute("UPDATE directory SET version = version + 1 WHERE id = 1")
        self._append_audit(audit)

    def _append_audit(self, e: AuditEntry) -> None:
        self.db.execute(
            "INSERT INTO audit (id, time, tenant, action, data) VALUES (?, ?, ?, ?, ?)",
            (e.id, e.time, e.tenant, e.action, directory.audit_json(e).decode()),
        )

    def _outbox_entry(self, event_id: str) -> OutboxEntry | None:
        row = self.db.execute(
            f"SELECT {OUTBOX_COLUMNS} FROM webhooks w LEFT JOIN tasks t ON t.rid = w.rid WHERE w.event_id = ?",
            (event_id,),
        ).fetchone()
        return _outbox_entry(row) if row else None

    def _get(self, rid: str, db: sqlite3.Connection | None = None) -> TaskRecord | None:
        row = (db or self.db).execute("SELECT * FROM tasks WHERE rid = ?", (rid,)).fetchone()
        return _record(row) if row else None

    def _insert_task(self, r: TaskRecord) -> None:
        self.db.execute(
            "INSERT INTO tasks (rid, tenant, task_id, key_index, status, task, hook, task_type, credits, charge_day,"
            " charge_month, created_at, updated_at, active, settled, timed_out, deleted, next_poll_at, meta, key_id,"
            " key_limited, relay) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                r.rid,
                r.tenant_id,
                r.task_id,
                r.key_index,
                r.status,
                orjson.dumps(r.task).decode(),
                r.hook,
                r.task_type,
                r.credits,
                r.charge_day,
                r.charge_month,
                r.created_at,
                r.updated_at,
                int(r.active),
                int(r.settled),
                int(r.timed_out),
                int(r.deleted),
                r.next_poll_at,
                orjson.dumps(r.meta).decode(),
                r.key_id,
                int(r.key_limited),
                r.relay,
            ),
        )

    def _update_task(self, r: TaskRecord) -> None:
        self.db.execute(
            "UPDATE tasks SET task_id = ?, status = ?, task = ?, updated_at = ?, active = ?, settled = ? WHERE rid = ?",
            (r.task_id, r.status, orjson.dumps(r.task).decode(), r.updated_at, int(r.active), int(r.settled), r.rid),
        )

    def _adopt(self, rec: TaskRecord, now: float) -> TaskRecord:
        """Insert a task the gateway never recorded, charging it as an admission would."""
        q = self._quota(rec.tenant_id, now)
        rules.charge(q, rec.credits)
        self._save_quota(rec.tenant_id, q)
        rec.status, rec.active, rec.charge_day, rec.charge_month = SUBMITTING, True, q.day, q.month
        self._insert_task(rec)
        self._book(rules.book_charge(rec))
        return rec

    def _book(self, b: Booking) -> None:
        """Add a booking to its ledger row (one UPSERT); a reversal that leaves the row all
        zero deletes it (a create the upstream did not accept leaves no trace)."""
        d = b.deltas
        counts = tuple(d.get(name, 0) for name in LEDGER_COUNTERS)
        self.db.execute(
            "INSERT INTO ledger (day, tenant, key_id, relay, tasks_created, tasks_succeeded, tasks_failed,"
            " credits_charged, credits_refunded) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (day, tenant, key_id, relay) DO UPDATE SET"
            " tasks_created = tasks_created + excluded.tasks_created,"
            " tasks_succeeded = tasks_succeeded + excluded.tasks_succeeded,"
            " tasks_failed = tasks_failed + excluded.tasks_failed,"
            " credits_charged = credits_charged + excluded.credits_charged,"
            " credits_refunded = credits_refunded + excluded.credits_refunded",
            (b.day, b.tenant_id, b.key_id, b.relay, *counts),
        )
        if min(counts) < 0:
            self.db.execute(
                "DELETE FROM ledger WHERE day = ? AND tenant = ? AND key_id = ? AND relay = ? AND tasks_created = 0"
                " AND tasks_succeeded = 0 AND tasks_failed = 0 AND credits_charged = 0 AND credits_refunded = 0",
                (b.day, b.tenant_id, b.key_id, b.relay),
            )

    def _enqueue_event(self, rec: TaskRecord, now: float) -> str:
        seq = self.db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM webhooks WHERE rid = ?", (rec.rid,)).fetchone()[0]
        event_id = new_event_id(now)
        self.db.execute(
            "INSERT INTO webhooks (event_id, rid, tenant, seq, url, body, attempts, next_at, state, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, 0, ?, 'pending', ?)",
            (event_id, rec.rid, rec.tenant_id, seq, rec.hook, orjson.dumps({"task": rec.task}), now, now),
        )
        return event_id


def _with_limits(kq: Quota | None, key: KeyLimits | None) -> tuple[Quota, Limits] | None:
    """A key's quota with its limits, as the rules take them (None: no key limits)."""
    return (kq, key.limits) if kq is not None and key is not None else None


def _equal_filters(sql: list[str], filters: dict[str, Any]) -> list[Any]:
    """`AND column = ?` appended to `sql` for each filter given (not None), for a list
    query's optional filters; returns the arguments, in order."""
    args: list[Any] = []
    for column, value in filters.items():
        if value is not None:
            sql.append(f"AND {column} = ?")
            args.append(value)
    return args


def _tenant(row: sqlite3.Row) -> TenantRecord:
    return directory.tenant_from_fields(orjson.loads(row["data"]))


def _key(row: sqlite3.Row) -> KeyRecord:
    return directory.key_from_fields(orjson.loads(row["data"]))


def _outbox_entry(row: sqlite3.Row) -> OutboxEntry:
    dead = row["state"] == "dead"
    return OutboxEntry(
        event_id=row["event_id"],
        tenant_id=row["tenant"],
        rid=row["rid"],
        task_id=row["task_id"],
        seq=row["seq"],
        state=row["state"],
        attempts=row["attempts"],
        next_at=None if dead else row["next_at"],
        last_error=row["last_error"],
        created_at=row["created_at"],
    )


def _record(row: sqlite3.Row) -> TaskRecord:
    return TaskRecord(
        rid=row["rid"],
        tenant_id=row["tenant"],
        status=row["status"],
        task_id=row["task_id"],
        key_index=row["key_index"],
        task=orjson.loads(row["task"]),
        hook=row["hook"],
        task_type=row["task_type"],
        credits=row["credits"],
        charge_day=row["charge_day"],
        charge_month=row["charge_month"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        active=bool(row["active"]),
        settled=bool(row["settled"]),
        timed_out=bool(row["timed_out"]),
        deleted=bool(row["deleted"]),
        next_poll_at=row["next_poll_at"],
        meta=orjson.loads(row["meta"]),
        key_id=row["key_id"],
        key_limited=bool(row["key_limited"]),
        relay=row["relay"] or "",
    )
