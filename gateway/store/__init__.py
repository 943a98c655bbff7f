"""The gateway's shared state: `base.py` (the Store interface and its records), `rules.py`
(the quota and lifecycle rules both stores follow), `sqlite/` and `redis/` (the stores).
`open_store(url)` picks one from `[store] url`."""

from gateway.store.base import Store
from gateway.store.redis import RedisStore
from gateway.store.sqlite import SQLiteStore

__all__ = ["Store", "open_store"]


def open_store(url: str) -> Store:
    """`sqlite:///PATH` or `redis[s]://...` (config has validated it); not opened yet.
    A `?prefix=...` in a Redis URL namespaces the keys."""
    if url.startswith("sqlite:///"):
        return SQLiteStore(url.removeprefix("sqlite:///"))
    return RedisStore(url)
