"""Group commit for SQLite: the writes of one event-loop turn share one transaction.

Also the line between an outage and a bug: an SQLite error that says the database cannot
answer or take writes right now becomes StoreUnavailable (503); anything else stays what
it is (a 500).
"""

from __future__ import annotations

import asyncio
import sqlite3

from gateway.store.base import StoreUnavailable

LOCK_TIMEOUT = 10.0  # seconds an operation waits for another process's write lock
MAX_GROUP_TURNS = 3  # loop turns a growing write group may stay open (docs/benchmarks.md)

# SQLite result codes (the primary code, low byte) that say the database cannot answer or
# take writes right now. Anything else (a bad statement, a constraint) is a bug: a 500.
UNAVAILABLE_CODES = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_READONLY,
    }
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


class GroupCommit:
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
                begun = try_begin(self.db)
            if begun:
                self._waiters, self._seen, self._turns = [], 0, 0
                loop.call_soon(self._turn_ended)
                return
            if loop.time() >= deadline:
                raise StoreUnavailable(
                    f"SQLite: database is locked (write lock not free within {self.lock_timeout:g} s)"
                )
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


def try_begin(db: sqlite3.Connection) -> bool:
    """`BEGIN IMMEDIATE` without waiting (the writer's busy timeout is 0): False when
    another connection holds the write lock."""
    try:
        db.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY:  # SQLITE_BUSY_RECOVERY too
            raise
        return False
    return True
