"""The SQLite store: `store.py` (the operations), `schema.py` (tables, connections,
checkpoints), `group_commit.py` (one transaction per event-loop turn, outage errors)."""

from gateway.store.sqlite.group_commit import MAX_GROUP_TURNS
from gateway.store.sqlite.store import SQLiteStore

__all__ = ["MAX_GROUP_TURNS", "SQLiteStore"]
