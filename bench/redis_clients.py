"""Client CPU per Redis command: redis-py's asyncio client vs gateway/store/redis/client.py.

    .venv/bin/python bench/redis_clients.py [--url redis://host:port/db] [--callers 16] [--calls 3000]

Each client runs the same trivial script by EVALSHA from C concurrent callers on uvloop (as
the gateway serves); the table gives this process's CPU time (utime + stime) per command and
commands per second. Redis's own CPU is not counted. Only reads: nothing is written.
Without `--url` it runs on a private redis-server of its own (as bench/run.py does).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvloop

SCRIPT = "return ARGV[1]"


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def run(call: Callable[[int], Awaitable[Any]], callers: int, calls: int) -> tuple[float, float]:
    async def caller(c: int) -> None:
        for i in range(calls):
            await call(i)

    await asyncio.gather(*(caller(c) for c in range(2)))  # warm: connections, scripts
    c0, t0 = cpu(), time.perf_counter()
    await asyncio.gather(*(caller(c) for c in range(callers)))
    n = callers * calls
    return (cpu() - c0) / n * 1e6, n / (time.perf_counter() - t0)


def _evalsha(script: Any) -> Callable[[int], Awaitable[Any]]:
    """One call of `script` (either client's registered script) with argument i."""
    return lambda i: script(args=[i])


async def main(url: str, callers: int, calls: int) -> None:
    import redis.asyncio as aioredis

    from gateway.store.redis.client import RedisClient

    rows: list[tuple[str, float, float]] = []
    for _ in range(2):  # alternate, twice: the machine is shared
        py = aioredis.Redis.from_url(url)
        script = py.register_script(SCRIPT)
        rows.append(("redis-py asyncio", *await run(_evalsha(script), callers, calls)))
        await py.aclose()
        lean = RedisClient(url)
        lscript = lean.register_script(SCRIPT)
        await lean.load_scripts()
        rows.append(("gateway RedisClient", *await run(_evalsha(lscript), callers, calls)))
        await lean.aclose()
    print(f"{callers} concurrent callers x {calls} EVALSHA each, uvloop\n")
    print("| client | client CPU µs/command | commands/s |")
    print("|---|---:|---:|")
    for name, us, rate in rows:
        print(f"| {name} | {us:,.1f} | {rate:,.0f} |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="", help="default: a private redis-server on a free port, stopped at the end")
    p.add_argument("--callers", type=int, default=16)
    p.add_argument("--calls", type=int, default=3000)
    a = p.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.run import BenchRedis

    with tempfile.TemporaryDirectory(prefix="runway-redis-clients-") as workdir:
        redis_server = BenchRedis(a.url, Path(workdir))
        try:
            problem = redis_server.start()
            if problem:
                raise SystemExit(f"Redis not usable: {problem}")
            uvloop.run(main(redis_server.url, a.callers, a.calls))
        finally:
            redis_server.stop()
