"""The embedded store: one SQLite file in WAL mode, shared by every worker process.

Operations run directly on the event loop: a thread hop (aiosqlite) costs ~10x the query
itself (docs/benchmarks.md). Writes use group commit: the operations of one event-loop turn
share one `BEGIN IMMEDIATE` transaction, each inside a SAVEPOINT of its own, and each caller
resumes only after the shared COMMIT, so an answer never gets ahead of its data. `BEGIN
IMMEDIATE` takes the write lock before reading, so check-then-increment cannot race, in this
process or another. Automatic WAL checkpoints are off on the request path (their fsync
stalls the loop); `maintain()` checkpoints from a thread instead.

Two connections: the writer runs every statement inside a group's transaction, so the only
lock it can meet is at `BEGIN`, which waits on the event loop (busy timeout 0); the reader
answers reads outside a transaction (they see committed data only) and keeps SQLite's busy
timeout for the one lock a WAL read can meet, another process recovering the WAL.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from gateway.config import Limits
from gateway.store.base import (
    REFUNDABLE,
    SUBMITTING,
    TERMINAL,
    UNKNOWN,
    Admission,
    Charge,
    IdempotencyResult,
    RateInfo,
    Store,
    StoredResponse,
    StoreUnavailable,
    TaskRecord,
    UpdateResult,
    Usage,
    WebhookEvent,
    bucket_info,
    bucket_retry_after,
    bucket_take,
    day_key,
    month_key,
    seconds_to_next_day,
    seconds_to_next_month,
    status_rank,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS quota (
    tenant TEXT PRIMARY KEY,
    rpm_tokens REAL, rpm_ts REAL NOT NULL DEFAULT 0,
    tpm_tokens REAL, tpm_ts REAL NOT NULL DEFAULT 0,
    active INTEGER NOT NULL DEFAULT 0,
    day TEXT NOT NULL DEFAULT '', day_tasks INTEGER NOT NULL DEFAULT 0, day_credits INTEGER NOT NULL DEFAULT 0,
    month TEXT NOT NULL DEFAULT '', month_credits INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS tasks (
    rid TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    task_id TEXT UNIQUE,
    key_index INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL,
    task TEXT NOT NULL DEFAULT '{}',
    hook TEXT NOT NULL DEFAULT '',
    task_type TEXT NOT NULL DEFAULT 'gen2',
    credits INTEGER NOT NULL DEFAULT 0,
    charge_day TEXT NOT NULL DEFAULT '',
    charge_month TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    active INTEGER NOT NULL DEFAULT 1,
    settled INTEGER NOT NULL DEFAULT 0,
    timed_out INTEGER NOT NULL DEFAULT 0,
    deleted INTEGER NOT NULL DEFAULT 0,
    next_poll_at REAL NOT NULL DEFAULT 0,
    meta TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS tasks_by_tenant ON tasks (tenant, created_at);
CREATE INDEX IF NOT EXISTS tasks_to_poll ON tasks (next_poll_at)
    WHERE status NOT IN ('SUCCEEDED', 'FAILED', 'CANCELLED') AND task_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS tasks_active ON tasks (created_at) WHERE active = 1;
CREATE INDEX IF NOT EXISTS tasks_unknown ON tasks (created_at) WHERE active = 1 AND status = 'UNKNOWN';
CREATE TABLE IF NOT EXISTS webhooks (
    event_id TEXT PRIMARY KEY,
    rid TEXT NOT NULL,
    tenant TEXT NOT NULL,
    seq INTEGER NOT NULL,
    url TEXT NOT NULL,
    body BLOB NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS webhooks_due ON webhooks (state, next_at);
CREATE INDEX IF NOT EXISTS webhooks_by_task ON webhooks (rid, seq);
CREATE TABLE IF NOT EXISTS idempotency (
    tenant TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    state TEXT NOT NULL,
    status INTEGER NOT NULL DEFAULT 0,
    headers TEXT NOT NULL DEFAULT '{}',
    body BLOB NOT NULL DEFAULT x'',
    expires_at REAL NOT NULL,
    rid TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (tenant, key)
);
CREATE INDEX IF NOT EXISTS idempotency_expiry ON idempotency (expires_at);
CREATE TABLE IF NOT EXISTS secrets (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS assets (
    asset_id TEXT PRIMARY KEY,
    content_type TEXT NOT NULL,
    data BLOB NOT NULL,
    expires_at REAL NOT NULL
);
"""

TERMINAL_SQL = "('SUCCEEDED', 'FAILED', 'CANCELLED')"
DEAD_EVENT_RETENTION = 7 * 86400
LOCK_TIMEOUT = 10.0  # seconds an operation waits for another process's write lock
BUSY_TIMEOUT_MS = 10000  # the reader's wait, for the rare lock a read meets (WAL recovery)
MAX_GROUP_TURNS = 3  # loop turns a growing write group may stay open (docs/benchmarks.md)
# SQLite result codes (the primary code, low byte) that say the database cannot answer or
# take writes right now. Anything else (a bad statement, a constraint) is a bug: a 500.
UNAVAILABLE_CODES = frozenset(
    {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_FULL, sqlite3.SQLITE_READONLY}
)


def unavailable(exc: BaseException) -> StoreUnavailable | None:
    """The StoreUnavailable a SQLite error stands for, or None when it is not an outage."""
    code = getattr(exc, "sqlite_errorcode", None) if isinstance(exc, sqlite3.Error) else None
    if code is not None and code & 0xFF in UNAVAILABLE_CODES:
        return StoreUnavailable(f"SQLite: {exc}")
    return None


class _Outage:
    """`with OUTAGE:` around reads outside a write group: an outage-kind SQLite error
    leaves as StoreUnavailable, any other error unchanged (a class, not a generator-based
    context manager: it costs next to nothing on the way through)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if exc is not None and (err := unavailable(exc)) is not None:
            raise err from exc


OUTAGE = _Outage()


@dataclass
class _Quota:
    """A tenant's quota row, with the day and month already rolled to `now`."""

    rpm_tokens: float | None
    rpm_ts: float
    tpm_tokens: float | None
    tpm_ts: float
    active: int
    day: str
    day_tasks: int
    day_credits: int
    month: str
    month_credits: int


class SQLiteStore(Store):
    def __init__(self, path: str):
        self.path = path
        self._db: sqlite3.Connection | None = None  # the writer
        self._reader: sqlite3.Connection | None = None
        self._write: _GroupCommit | None = None

    # lifecycle ----------------------------------------------------------------------
    async def open(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        db = _connect(self.path)
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(SCHEMA)  # with the busy timeout: workers starting together queue here
        _migrate(db)
        db.execute("PRAGMA busy_timeout=0")
        self._db = db
        self._reader = db if self.path == ":memory:" else _connect(self.path)
        self._write = _GroupCommit(db)

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
            self.db.execute("DELETE FROM idempotency WHERE expires_at <= ?", (now,))
            self.db.execute("DELETE FROM assets WHERE expires_at <= ?", (now,))
            self.db.execute("DELETE FROM webhooks WHERE state = 'dead' AND next_at <= ?", (now - DEAD_EVENT_RETENTION,))
        await asyncio.to_thread(_checkpoint, self.path)

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
    def _tx(self) -> "_GroupCommit":
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
    async def take_request(self, tenant_id: str, limits: Limits, now: float) -> Admission:
        cap = limits.requests_per_minute
        if cap is None:
            return Admission(ok=True)
        async with self._tx:
            q = self._quota(tenant_id, now)
            level, ok = bucket_take(q.rpm_tokens, q.rpm_ts, cap, now)
            if not ok:
                return Admission(False, "requests_per_minute", bucket_retry_after(level, cap), bucket_info(level, cap))
            self.db.execute(
                "UPDATE quota SET rpm_tokens = ?, rpm_ts = ? WHERE tenant = ?", (level, max(q.rpm_ts, now), tenant_id)
            )
        return Admission(True, rate=bucket_info(level, cap))

    async def admit_create(self, tenant_id: str, limits: Limits, charge: Charge, reservation: TaskRecord, now: float) -> Admission:
        async with self._tx:
            q = self._quota(tenant_id, now)
            refusal, rate = _check_create(q, limits, charge.credits, now)
            if refusal is not None:
                refusal.rate = rate
                return refusal
            q.active += 1
            q.day_tasks += 1
            q.day_credits += charge.credits
            q.month_credits += charge.credits
            self._save_quota(tenant_id, q)
            reservation.charge_day, reservation.charge_month, reservation.credits = q.day, q.month, charge.credits
            self._insert_task(reservation)
        return Admission(True, rate=rate)

    async def settle_not_created(self, rid: str, now: float) -> bool:
        async with self._tx:
            rec = self._get(rid)
            if rec is None or rec.status not in (SUBMITTING, UNKNOWN) or rec.settled:
                return False
            q = self._quota(rec.tenant_id, now)
            if rec.active:
                q.active = max(0, q.active - 1)
            if rec.charge_day == q.day:
                q.day_tasks = max(0, q.day_tasks - 1)
            _refund_credits(q, rec)
            self._save_quota(rec.tenant_id, q)
            self.db.execute("DELETE FROM tasks WHERE rid = ?", (rid,))
        return True

    async def mark_unknown(self, rid: str, now: float) -> None:
        async with self._tx:
            self.db.execute(
                "UPDATE tasks SET status = ?, updated_at = ? WHERE rid = ? AND status = ?", (UNKNOWN, now, rid, SUBMITTING)
            )

    async def apply_update(
        self, rid: str, tenant_id: str, task: dict[str, Any], now: float, *, refund_failed: bool, adopt: TaskRecord | None = None
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
            result = _decide_update(rec, task, now, refund_failed)
            result.adopted = adopted
            if not result.applied:
                return result
            if result.finished:
                q = self._quota(rec.tenant_id, now)
                if result.freed_slot:
                    q.active = max(0, q.active - 1)
                if result.refunded_credits:
                    _refund_credits(q, rec)
                self._save_quota(rec.tenant_id, q)
            self._update_task(rec)
            if result.status_changed and rec.hook and not (result.previous_status == SUBMITTING and rec.status == "PENDING"):
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

    async def set_meta(self, rid: str, meta: dict[str, Any]) -> None:
        async with self._tx:
            row = self.db.execute("SELECT meta FROM tasks WHERE rid = ?", (rid,)).fetchone()
            if row is not None:
                merged = orjson.loads(row["meta"]) | meta
                self.db.execute("UPDATE tasks SET meta = ? WHERE rid = ?", (orjson.dumps(merged).decode(), rid))

    async def usage(self, tenant_id: str, now: float) -> Usage:
        async with self._tx:
            q = self._quota(tenant_id, now)
        return Usage(q.active, q.day_tasks, q.day_credits, q.month_credits)

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
                f"UPDATE tasks SET next_poll_at = ? WHERE rid = ? AND next_poll_at <= ? AND status NOT IN {TERMINAL_SQL}",
                (now + interval, rid, now),
            )
        return cur.rowcount == 1

    async def claim_due_polls(self, now: float, interval: float, limit: int, timed_out_interval: float, give_up_after: float) -> list[TaskRecord]:
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

    async def expire_tasks(self, now: float, timeout: float, unknown_timeout: float) -> list[TaskRecord]:
        async with self._tx:
            rows = self.db.execute(
                f"SELECT * FROM tasks WHERE active = 1 AND status NOT IN {TERMINAL_SQL} AND created_at <= ?"
                " UNION SELECT * FROM tasks WHERE active = 1 AND status = 'UNKNOWN' AND created_at <= ?",
                (now - timeout, now - unknown_timeout),
            ).fetchall()
            records = [_record(r) for r in rows]
            for rec in records:
                rec.active, rec.timed_out = False, True
                self.db.execute("UPDATE tasks SET active = 0, timed_out = 1, updated_at = ? WHERE rid = ?", (now, rec.rid))
                self.db.execute("UPDATE quota SET active = MAX(0, active - 1) WHERE tenant = ?", (rec.tenant_id,))
        return records

    # webhook outbox -----------------------------------------------------------------
    async def claim_webhooks(self, now: float, limit: int, lease: float) -> list[WebhookEvent]:
        async with self._tx:
            rows = self.db.execute(
                "SELECT * FROM webhooks w WHERE state = 'pending' AND next_at <= ?"
                " AND seq = (SELECT MIN(seq) FROM webhooks v WHERE v.rid = w.rid AND v.state = 'pending')"
                " ORDER BY next_at LIMIT ?",
                (now, limit),
            ).fetchall()
            for r in rows:
                self.db.execute("UPDATE webhooks SET next_at = ? WHERE event_id = ?", (now + lease, r["event_id"]))
        return [
            WebhookEvent(r["event_id"], r["rid"], r["tenant"], r["seq"], r["url"], bytes(r["body"]), r["attempts"], r["created_at"])
            for r in rows
        ]

    async def finish_webhook(self, event_id: str, *, delivered: bool, attempts: int, next_at: float | None) -> None:
        async with self._tx:
            if delivered:
                self.db.execute("DELETE FROM webhooks WHERE event_id = ?", (event_id,))
            elif next_at is None:
                self.db.execute("UPDATE webhooks SET state = 'dead', attempts = ? WHERE event_id = ?", (attempts, event_id))
            else:
                self.db.execute("UPDATE webhooks SET attempts = ?, next_at = ? WHERE event_id = ?", (attempts, next_at, event_id))

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
    async def idem_begin(self, tenant_id: str, key: str, fingerprint: str, now: float, lease: float) -> IdempotencyResult:
        async with self._tx:
            row = self.db.execute("SELECT * FROM idempotency WHERE tenant = ? AND key = ?", (tenant_id, key)).fetchone()
            if row is not None and row["expires_at"] <= now:
                self.db.execute("DELETE FROM idempotency WHERE tenant = ? AND key = ?", (tenant_id, key))
                row = None
            if row is None:
                self.db.execute(
                    "INSERT INTO idempotency (tenant, key, fingerprint, state, expires_at) VALUES (?, ?, ?, 'pending', ?)",
                    (tenant_id, key, fingerprint, now + lease),
                )
                return IdempotencyResult("new")
        if row["fingerprint"] != fingerprint:
            return IdempotencyResult("conflict")
        if row["state"] == "pending":
            return IdempotencyResult("pending")
        if row["state"] == "unknown":
            return IdempotencyResult("unknown", rid=row["rid"])
        return IdempotencyResult("replay", StoredResponse(row["status"], orjson.loads(row["headers"]), bytes(row["body"])))

    async def idem_finish(self, tenant_id: str, key: str, response: StoredResponse | None, now: float, ttl: float) -> None:
        async with self._tx:
            if response is None:
                self.db.execute("DELETE FROM idempotency WHERE tenant = ? AND key = ? AND state = 'pending'", (tenant_id, key))
            else:
                self.db.execute(
                    "UPDATE idempotency SET state = 'done', status = ?, headers = ?, body = ?, expires_at = ?"
                    " WHERE tenant = ? AND key = ?",
                    (response.status, orjson.dumps(response.headers).decode(), response.body, now + ttl, tenant_id, key),
                )

    async def idem_bind(self, tenant_id: str, key: str, rid: str, now: float, ttl: float) -> None:
        async with self._tx:
            self.db.execute(
                "UPDATE idempotency SET state = 'unknown', rid = ?, expires_at = ? WHERE tenant = ? AND key = ? AND state = 'pending'",
                (rid, now + ttl, tenant_id, key),
            )

    # internals (each runs inside the caller's transaction) --------------------------
    def _quota(self, tenant_id: str, now: float) -> _Quota:
        row = self.db.execute("SELECT * FROM quota WHERE tenant = ?", (tenant_id,)).fetchone()
        if row is None:
            self.db.execute("INSERT INTO quota (tenant) VALUES (?)", (tenant_id,))
            row = self.db.execute("SELECT * FROM quota WHERE tenant = ?", (tenant_id,)).fetchone()
        q = _Quota(
            row["rpm_tokens"], row["rpm_ts"], row["tpm_tokens"], row["tpm_ts"], row["active"],
            row["day"], row["day_tasks"], row["day_credits"], row["month"], row["month_credits"],
        )
        today, this_month = day_key(now), month_key(now)
        # Periods only move forward: a replica whose clock lags must not wipe today's counts.
        if q.day < today:
            q.day, q.day_tasks, q.day_credits = today, 0, 0
        if q.month < this_month:
            q.month, q.month_credits = this_month, 0
        return q

    def _save_quota(self, tenant_id: str, q: _Quota) -> None:
        self.db.execute(
            "UPDATE quota SET rpm_tokens = ?, rpm_ts = ?, tpm_tokens = ?, tpm_ts = ?, active = ?, day = ?, day_tasks = ?,"
            " day_credits = ?, month = ?, month_credits = ? WHERE tenant = ?",
            (q.rpm_tokens, q.rpm_ts, q.tpm_tokens, q.tpm_ts, q.active, q.day, q.day_tasks, q.day_credits, q.month, q.month_credits, tenant_id),
        )

    def _get(self, rid: str, db: sqlite3.Connection | None = None) -> TaskRecord | None:
        row = (db or self.db).execute("SELECT * FROM tasks WHERE rid = ?", (rid,)).fetchone()
        return _record(row) if row else None

    def _insert_task(self, r: TaskRecord) -> None:
        self.db.execute(
            "INSERT INTO tasks (rid, tenant, task_id, key_index, status, task, hook, task_type, credits, charge_day,"
            " charge_month, created_at, updated_at, active, settled, timed_out, deleted, next_poll_at, meta)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                r.rid, r.tenant_id, r.task_id, r.key_index, r.status, orjson.dumps(r.task).decode(), r.hook, r.task_type,
                r.credits, r.charge_day, r.charge_month, r.created_at, r.updated_at, int(r.active), int(r.settled),
                int(r.timed_out), int(r.deleted), r.next_poll_at, orjson.dumps(r.meta).decode(),
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
        q.active += 1
        q.day_tasks += 1
        q.day_credits += rec.credits
        q.month_credits += rec.credits
        self._save_quota(rec.tenant_id, q)
        rec.status, rec.active, rec.charge_day, rec.charge_month = SUBMITTING, True, q.day, q.month
        self._insert_task(rec)
        return rec

    def _enqueue_event(self, rec: TaskRecord, now: float) -> str:
        seq = self.db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM webhooks WHERE rid = ?", (rec.rid,)).fetchone()[0]
        event_id = f"evt_{uuid.uuid4().hex}"
        self.db.execute(
            "INSERT INTO webhooks (event_id, rid, tenant, seq, url, body, attempts, next_at, state, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, 0, ?, 'pending', ?)",
            (event_id, rec.rid, rec.tenant_id, seq, rec.hook, orjson.dumps({"task": rec.task}), now, now),
        )
        return event_id


# --- pure decisions, shared shape with the Redis scripts ------------------------------


class _Decision(UpdateResult):
    freed_slot: bool = False


def _check_create(q: _Quota, limits: Limits, credits: int, now: float) -> tuple[Admission | None, RateInfo | None]:
    """Check every limit of a create against `q`, taking the rate tokens in `q` on success.
    Returns (refusal or None, the tightest rate bucket's header info as it stands after)."""
    buckets: list[tuple[float, int, bool]] = []  # (level after, capacity, token taken)
    refusal: Admission | None = None
    for name, cap in (("requests_per_minute", limits.requests_per_minute), ("tasks_per_minute", limits.tasks_per_minute)):
        if cap is None:
            continue
        tokens, ts = (q.rpm_tokens, q.rpm_ts) if name == "requests_per_minute" else (q.tpm_tokens, q.tpm_ts)
        level, ok = bucket_take(tokens, ts, cap, now)
        buckets.append((level, cap, ok))
        if not ok:
            refusal = refusal or Admission(False, name, bucket_retry_after(level, cap))
        elif name == "requests_per_minute":
            q.rpm_tokens, q.rpm_ts = level, max(ts, now)
        else:
            q.tpm_tokens, q.tpm_ts = level, max(ts, now)
    if refusal is None:
        refusal = _check_budgets(q, limits, credits, now)
    # A refused create takes no token: report the buckets as they were.
    infos = [bucket_info(level + 1.0 if (taken and refusal) else level, cap) for level, cap, taken in buckets]
    return refusal, (min(infos, key=lambda r: r.remaining) if infos else None)


def _check_budgets(q: _Quota, limits: Limits, credits: int, now: float) -> Admission | None:
    if limits.max_active_tasks is not None and q.active + 1 > limits.max_active_tasks:
        return Admission(False, "max_active_tasks", 1.0)
    if limits.tasks_per_day is not None and q.day_tasks + 1 > limits.tasks_per_day:
        return Admission(False, "tasks_per_day", seconds_to_next_day(now))
    if limits.credits_per_day is not None and q.day_credits + credits > limits.credits_per_day:
        return Admission(False, "credits_per_day", seconds_to_next_day(now))
    if limits.credits_per_month is not None and q.month_credits + credits > limits.credits_per_month:
        return Admission(False, "credits_per_month", seconds_to_next_month(now))
    return None


def _refund_credits(q: _Quota, rec: TaskRecord) -> None:
    """Give a task's credits back to the periods it was charged in, while they are current."""
    if rec.charge_day == q.day:
        q.day_credits = max(0, q.day_credits - rec.credits)
    if rec.charge_month == q.month:
        q.month_credits = max(0, q.month_credits - rec.credits)


def _decide_update(rec: TaskRecord, task: dict[str, Any], now: float, refund_failed: bool) -> _Decision:
    """The compare-and-set: mutate `rec` when `task` is newer, and say what changed."""
    new_status = str(task.get("status") or "")
    result = _Decision(rec, previous_status=rec.status)
    if not new_status or rec.terminal:
        return result
    old_rank, new_rank = status_rank(rec.status), status_rank(new_status)
    if new_rank < old_rank:
        return result
    if new_status == rec.status and str(task.get("updatedAt") or "") < str(rec.task.get("updatedAt") or ""):
        return result
    result.applied = True
    result.status_changed = new_status != rec.status
    rec.task, rec.status, rec.updated_at = task, new_status, now
    if rec.task_id is None and task.get("id"):
        rec.task_id = str(task["id"])
    if new_status in TERMINAL:
        result.finished = True
        result.freed_slot = rec.active
        rec.active = False
        if not rec.settled:
            rec.settled = True
            if new_status in REFUNDABLE and refund_failed and rec.credits:
                result.refunded_credits = rec.credits
    return result


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
    )


class _GroupCommit:
    """One transaction for all operations of an event-loop turn (group commit).

    A COMMIT is most of a small write's cost (its WAL frames and locks, docs/benchmarks.md),
    so operations that arrive together share one. The first operation of a turn opens
    `BEGIN IMMEDIATE` and schedules `_turn_ended` for the next turn; each operation runs its
    statements synchronously inside `SAVEPOINT op` (an exception rolls back that operation
    only), then waits for the COMMIT. While a group of two or more is still growing (load
    is high), it stays open for up to `MAX_GROUP_TURNS` turns: bigger groups write each hot
    page (the quota row, the tables' last pages) once for more operations. A lone operation
    commits at the next turn, so an idle gateway adds no wait. A failed COMMIT fails every
    operation of the group: none of them has happened. Operations of one process cannot
    interleave (no await inside the block), and other processes wait on the write lock.
    """

    def __init__(self, db: sqlite3.Connection, lock_timeout: float = LOCK_TIMEOUT):
        self.db = db
        self.lock_timeout = lock_timeout
        self._waiters: list[asyncio.Future[None]] | None = None  # None: no open transaction
        self._seen = 0  # group size at the last end of turn
        self._turns = 0  # turns the group has been kept open for

    async def __aenter__(self) -> None:
        if self._waiters is None:
            await self._begin()
        self.db.execute("SAVEPOINT op")

    async def _begin(self) -> None:
        """Open the group's transaction. While another process holds the write lock, wait
        on the event loop, not in SQLite's busy handler: that one sleeps inside the call and
        would stop every request of this worker for as long as the other one writes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.lock_timeout
        delay = 0.0005
        while self._waiters is None:  # after a wait, another operation may have opened one
            with OUTAGE:
                begun = _try_begin(self.db)
            if begun:
                self._waiters, self._seen, self._turns = [], 0, 0
                loop.call_soon(self._turn_ended)
                return
            if loop.time() >= deadline:
                raise StoreUnavailable(f"SQLite: database is locked (write lock not free within {self.lock_timeout:g} s)")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.01)

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if exc_type is not None:
            with OUTAGE:
                self.db.execute("ROLLBACK TO op")
                self.db.execute("RELEASE op")
            if exc is not None and (err := unavailable(exc)) is not None:
                raise err from exc
            return
        self.db.execute("RELEASE op")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        assert self._waiters is not None
        self._waiters.append(done)
        await done

    def _turn_ended(self) -> None:
        """Keep a growing group open one more turn, else COMMIT it."""
        waiters = self._waiters
        if waiters is not None and len(waiters) > max(self._seen, 1) and self._turns < MAX_GROUP_TURNS:
            self._seen, self._turns = len(waiters), self._turns + 1
            asyncio.get_running_loop().call_soon(self._turn_ended)
            return
        self.flush()

    def flush(self) -> None:
        """COMMIT the open group and wake its operations (a no-op when none is open)."""
        waiters, self._waiters = self._waiters, None
        if waiters is None:
            return
        try:
            self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            error = unavailable(exc) or exc
            for w in waiters:
                if not w.done():
                    w.set_exception(error)
            return
        for w in waiters:
            if not w.done():
                w.set_result(None)


def _migrate(db: sqlite3.Connection) -> None:
    """Columns added after a table's first release (CREATE TABLE IF NOT EXISTS keeps an old
    table as it was). Workers starting together may race: the loser's duplicate is fine."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(idempotency)")}
    if "rid" not in columns:
        try:
            db.execute("ALTER TABLE idempotency ADD COLUMN rid TEXT NOT NULL DEFAULT ''")
        except sqlite3.OperationalError as exc:
            if "duplicate column" not in str(exc):
                raise


def _connect(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA wal_autocheckpoint=0")
    return db


def _try_begin(db: sqlite3.Connection) -> bool:
    """`BEGIN IMMEDIATE` without waiting (the writer's busy timeout is 0): False when
    another connection holds the write lock."""
    try:
        db.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY:  # SQLITE_BUSY_RECOVERY too
            raise
        return False
    return True


def _checkpoint(path: str) -> None:
    if path == ":memory:":
        return
    db = sqlite3.connect(path, timeout=10.0)
    try:
        # PASSIVE copies what it can without waiting; under steady writes it never reaches
        # the last frame, so the WAL (and its mmapped index, counted in RSS) would grow
        # forever. TRUNCATE then resets it; the copy already done keeps its pause short.
        db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()

