"""The Redis store: `store.py` (the operations), `scripts/*.lua` (one Lua script per
operation, `lib.lua` the shared helpers), `client.py` (the lean asyncio client), `url.py`
(store URLs, importable without the rest)."""

from gateway.store.redis.store import RedisStore

__all__ = ["RedisStore"]
