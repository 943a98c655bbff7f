"""CPU per request of the gateway's ASGI middleware (request id, body limit, rate headers,
metrics, access log), in process: the same request through the middleware and without it.

    .venv/bin/python bench/middleware_micro.py [--requests 20000] [--repeat 5]

The inner app does what a create's route leaves for the middleware (tenant, key id, rate
bucket, upstream time, task id) and answers 200 with a small JSON body; the access log goes
to /dev/null. Best of `--repeat` runs (the machine is shared), in µs of process CPU time.
Compare two trees with PYTHONPATH=<tree>.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from typing import Any

from prometheus_client import CollectorRegistry

from gateway.logs import AccessLog
from gateway.metrics import Metrics
from gateway.middleware import GatewayMiddleware, request_context
from gateway.store.base import RateInfo

BODY = b'{"taskType":"gen2","options":{"seed":1}}'
SCOPE: dict[str, Any] = {
    "type": "http",
    "method": "POST",
    "path": "/runway/tasks",
    "client": ("127.0.0.1", 50000),
    "headers": [
        (b"host", b"127.0.0.1:8080"),
        (b"authorization", b"Bearer sk-gw-bench-0123456789"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(BODY)).encode()),
    ],
}


class _Route:
    path = "/runway/tasks"


async def inner(scope: dict[str, Any], receive: Any, send: Any) -> None:
    scope["route"] = _Route
    if CONTEXT_ON:
        ctx = request_context(scope)
        ctx.tenant, ctx.key_id, ctx.task_id = "bench", "key_0123", "task-0123"
        ctx.rate, ctx.upstream_ms = RateInfo(1000, 999, 0.06), 1.234
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"task":{"id":"task-0123"}}'})


CONTEXT_ON = True


async def run(app: Any, n: int) -> float:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": BODY, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        return None

    start = time.process_time()
    for i in range(n):
        await app({**SCOPE}, receive, send)
        if i % 8 == 7:
            await asyncio.sleep(0)  # a loop turn now and then, as a busy server has (the access log flushes)
    return time.process_time() - start


async def main() -> None:
    global CONTEXT_ON
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args()
    metrics = Metrics(["bench"], registry=CollectorRegistry())
    with open(os.devnull, "w") as null:
        wrapped = GatewayMiddleware(inner, metrics, AccessLog(null), 65536)
        best_with = best_without = float("inf")
        for _ in range(a.repeat):
            best_with = min(best_with, await run(wrapped, a.requests))
            metrics.flush()
            CONTEXT_ON = False
            best_without = min(best_without, await run(inner, a.requests))
            CONTEXT_ON = True
    per = (best_with - best_without) / a.requests * 1e6
    print(
        f"middleware: {per:.2f} µs of CPU per request ({best_with / a.requests * 1e6:.2f} with it, "
        f"{best_without / a.requests * 1e6:.2f} without)"
    )


if __name__ == "__main__":
    asyncio.run(main())
