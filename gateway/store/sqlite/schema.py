"""The SQLite file: its schema, the columns added since, and how a connection is opened.

Automatic WAL checkpoints are off on the request path (their fsync stalls the loop);
`checkpoint()` runs from a thread instead (SQLiteStore.maintain).
"""

from __future__ import annotations

import sqlite3

BUSY_TIMEOUT_MS = 10000  # the reader's wait, for the rare lock a read meets (WAL recovery)

# the counters of one quota (token buckets, active tasks, day and month budgets): a tenant's
# and, with the same rules, an API key's own (contract §15)
QUOTA_COLUMNS = """
    rpm_tokens REAL, rpm_ts REAL NOT NULL DEFAULT 0,
    tpm_tokens REAL, tpm_ts REAL NOT NULL DEFAULT 0,
    active INTEGER NOT NULL DEFAULT 0,
    day TEXT NOT NULL DEFAULT '', day_tasks INTEGER NOT NULL DEFAULT 0, day_credits INTEGER NOT NULL DEFAULT 0,
    month TEXT NOT NULL DEFAULT '', month_credits INTEGER NOT NULL DEFAULT 0,
    month_tasks INTEGER NOT NULL DEFAULT 0
"""

SCHEMA = (
    "\nCREATE TABLE IF NOT EXISTS quota (\n    tenant TEXT PRIMARY KEY,"
    + QUOTA_COLUMNS
    + ");\n"
    # an API key's own quota (contract §15); a row only for a key that had limits when it
    # was admitted or polled
    + "CREATE TABLE IF NOT EXISTS key_quota (\n    key_id TEXT PRIMARY KEY,"
    + QUOTA_COLUMNS
    + ");\n"
    + """
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
    meta TEXT NOT NULL DEFAULT '{}',
    key_id TEXT,
    key_limited INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS tasks_by_tenant ON tasks (tenant, created_at);
CREATE INDEX IF NOT EXISTS tasks_to_poll ON tasks (next_poll_at)
    WHERE status NOT IN ('SUCCEEDED', 'FAILED', 'CANCELLED') AND task_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS tasks_active ON tasks (created_at) WHERE active = 1;
CREATE INDEX IF NOT EXISTS tasks_unknown ON tasks (created_at) WHERE active = 1 AND status = 'UNKNOWN';
CREATE INDEX IF NOT EXISTS tasks_submitting ON tasks (created_at) WHERE active = 1 AND status = 'SUBMITTING';
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
    created_at REAL NOT NULL,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS webhooks_due ON webhooks (state, next_at);
CREATE INDEX IF NOT EXISTS webhooks_by_task ON webhooks (rid, seq);
-- the admin listing: newest first by id (ids sort by creation), by state or by tenant
CREATE INDEX IF NOT EXISTS webhooks_by_state ON webhooks (state, event_id);
CREATE INDEX IF NOT EXISTS webhooks_by_tenant ON webhooks (tenant, event_id);
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
-- the usage ledger: one row per UTC day, tenant, key ('' = no key) and relay ('' = before
-- relays had ids: the first relay), rules.book_*
CREATE TABLE IF NOT EXISTS ledger (
    day TEXT NOT NULL,
    tenant TEXT NOT NULL,
    key_id TEXT NOT NULL DEFAULT '',
    relay TEXT NOT NULL DEFAULT '',
    tasks_created INTEGER NOT NULL DEFAULT 0,
    tasks_succeeded INTEGER NOT NULL DEFAULT 0,
    tasks_failed INTEGER NOT NULL DEFAULT 0,
    credits_charged INTEGER NOT NULL DEFAULT 0,
    credits_refunded INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, tenant, key_id, relay)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS ledger_by_tenant ON ledger (tenant, day);
-- the directory (store/directory.py): `data` is the JSON of a record's field map
CREATE TABLE IF NOT EXISTS tenants (id TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS config_key_uses (id TEXT PRIMARY KEY, last_used_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    created_at REAL NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS api_keys_by_tenant ON api_keys (tenant, created_at);
CREATE TABLE IF NOT EXISTS audit (
    id TEXT PRIMARY KEY,
    time REAL NOT NULL,
    tenant TEXT,
    action TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_by_time ON audit (time, id);
CREATE INDEX IF NOT EXISTS audit_by_tenant ON audit (tenant, time, id);
CREATE INDEX IF NOT EXISTS audit_by_action ON audit (action, time, id);
-- one row: the directory's version, bumped by every tenant or key change
CREATE TABLE IF NOT EXISTS directory (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL);
INSERT OR IGNORE INTO directory (id, version) VALUES (1, 0);
"""
)


# (table, column, definition): columns added after a table's first release
ADDED_COLUMNS = (
    ("idempotency", "rid", "TEXT NOT NULL DEFAULT ''"),
    ("quota", "month_tasks", "INTEGER NOT NULL DEFAULT 0"),  # counts from the upgrade on, as the ledger
    ("tasks", "key_id", "TEXT"),  # NULL for the tasks created before: no key known
    ("webhooks", "last_error", "TEXT"),
    ("tasks", "key_limited", "INTEGER NOT NULL DEFAULT 0"),  # charged to its key's quota (§15)
    ("tasks", "relay", "TEXT NOT NULL DEFAULT ''"),  # '' for the tasks created before: the first relay
)
_LEDGER_TABLE = SCHEMA[SCHEMA.index("CREATE TABLE IF NOT EXISTS ledger (") : SCHEMA.index(") WITHOUT ROWID;") + 15]
LEDGER_COLUMNS = "day, tenant, key_id, tasks_created, tasks_succeeded, tasks_failed, credits_charged, credits_refunded"


def migrate(db: sqlite3.Connection) -> None:
    """Columns added after a table's first release (CREATE TABLE IF NOT EXISTS keeps an old
    table as it was). Workers starting together may race: the loser's duplicate is fine."""
    for table, column, definition in ADDED_COLUMNS:
        columns = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if column in columns:
            continue
        try:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
        except sqlite3.OperationalError as exc:
            if "duplicate column" not in str(exc):
                raise
    _ledger_by_relay(db)


def _ledger_by_relay(db: sqlite3.Connection) -> None:
    """A ledger from before relays (no `relay` column, key (day, tenant, key_id)) rebuilt
    with the relay in its key, its rows under relay '' (the first relay), in one transaction."""
    db.execute("BEGIN IMMEDIATE")
    try:
        if "relay" not in {row[1] for row in db.execute("PRAGMA table_info(ledger)")}:
            db.execute("ALTER TABLE ledger RENAME TO ledger_before_relays")
            db.execute("DROP INDEX IF EXISTS ledger_by_tenant")
            db.execute(_LEDGER_TABLE)
            db.execute("CREATE INDEX IF NOT EXISTS ledger_by_tenant ON ledger (tenant, day)")
            db.execute(f"INSERT INTO ledger ({LEDGER_COLUMNS}) SELECT {LEDGER_COLUMNS} FROM ledger_before_relays")
            db.execute("DROP TABLE ledger_before_relays")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def connect(path: str) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), usable from the
    checkpoint thread, with rows by column name and no automatic checkpoints."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA wal_autocheckpoint=0")
    return db


def checkpoint(path: str) -> None:
    """Copy the WAL into the database file and reset it; blocking, so run in a thread."""
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
