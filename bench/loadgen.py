"""The fallback load generator, used when `wrk` is not installed.

Closed loop like wrk: C keep-alive connections, each sending its next request as soon as
the previous answer is read, for a fixed duration. A minimal HTTP/1.1 client on asyncio
streams (pre-built request bytes, Content-Length bodies only), so the generator itself costs
as little CPU as Python allows; uvloop is used when importable.

It is slower than wrk and shares the machine's cores with the servers under test, so on a
small machine it understates the fastest targets (the upstream alone most): compare its
tables with each other, not with wrk's. Prints the same `BENCH_JSON {...}` line as the wrk
scripts (bench/wrk_*.lua):

    .venv/bin/python -m bench.loadgen --url http://127.0.0.1:8080/runway/tasks --mode post --key K \
        [--connections 32] [--duration 10] [--task-id ID] [--create-every 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from urllib.parse import urlsplit

DEFAULT_BODY = (
    '{"taskType":"gen2","internal":false,"options":{"name":"bench","gen2Options":{"mode":"gen2","seed":1,'
    '"interpolate":false,"upscale":false,"watermark":false,"motion_score":22,"use_motion_score":true,'
    '"use_motion_vectors":false,"text_prompt":"The wind blows hair up."},"exploreMode":false,'
    '"assetGroupName":"Generative Video"}}'
)


def build_request(method: str, host: str, path: str, key: str, body: bytes | None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Authorization: Bearer {key}"]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


class Stats:
    def __init__(self) -> None:
        self.latencies: list[int] = []  # ns
        self.errors = {"connect": 0, "read": 0, "write": 0, "timeout": 0, "status": 0}


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = None
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
            break
    if length is None:
        raise ValueError("response without Content-Length")
    if length:
        await reader.readexactly(length)
    return status


async def connection(
    host: str, port: int, requests: list[bytes], deadline: float, stats: Stats, timeout: float
) -> None:
    reader = writer = None
    i = 0
    while time.monotonic() < deadline:
        if writer is None:
            try:
                reader, writer = await asyncio.open_connection(host, port)
            except OSError:
                stats.errors["connect"] += 1
                await asyncio.sleep(0.05)
                continue
        assert reader is not None
        req = requests[i % len(requests)]
        i += 1
        start = time.perf_counter_ns()
        try:
            writer.write(req)
            status = await asyncio.wait_for(_read_response(reader), timeout)
        except TimeoutError:
            stats.errors["timeout"] += 1
            writer.close()
            writer = None
            continue
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            stats.errors["read"] += 1
            writer.close()
            writer = None
            continue
        if time.monotonic() > deadline:
            break  # like wrk: an answer after the end does not count
        stats.latencies.append(time.perf_counter_ns() - start)
        if not 200 <= status < 400:
            stats.errors["status"] += 1
    if writer is not None:
        writer.close()


def percentile(sorted_values: list[int], p: float) -> int:
    if not sorted_values:
        return 0
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


async def run(
    url: str,
    mode: str,
    key: str,
    connections: int,
    duration: float,
    task_id: str,
    create_every: int,
    body: bytes,
    timeout: float,
) -> dict:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    hostport = f"{host}:{port}"
    path = parts.path or "/"
    post = build_request("POST", hostport, path if mode == "post" else "/runway/tasks", key, body)
    if mode == "post":
        requests = [post]
    elif mode == "get":
        requests = [build_request("GET", hostport, path, key, None)]
    else:
        poll = build_request("GET", hostport, f"/runway/tasks/{task_id}", key, None)
        requests = [poll] * (create_every - 1) + [post]
    stats = Stats()
    start = time.monotonic()
    deadline = start + duration
    await asyncio.gather(*(connection(host, port, requests, deadline, stats, timeout) for _ in range(connections)))
    elapsed = time.monotonic() - start
    lat = sorted(stats.latencies)
    return {
        "requests": len(lat),
        "duration_us": int(elapsed * 1e6),
        "p50_us": percentile(lat, 50) // 1000,
        "p99_us": percentile(lat, 99) // 1000,
        "mean_us": (sum(lat) / len(lat) / 1000) if lat else 0.0,
        "max_us": (lat[-1] // 1000) if lat else 0,
        **{f"errors_{k}": v for k, v in stats.errors.items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Closed-loop HTTP load generator (the bench's fallback for wrk).")
    p.add_argument("--url", required=True)
    p.add_argument("--mode", choices=("post", "get", "mixed"), default="post")
    p.add_argument("--key", default=os.environ.get("BENCH_KEY", ""))
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--task-id", default=os.environ.get("BENCH_TASK_ID", ""))
    p.add_argument("--create-every", type=int, default=4)
    p.add_argument("--timeout", type=float, default=10.0)
    a = p.parse_args(argv)
    body = os.environ.get("BENCH_BODY", DEFAULT_BODY).encode()
    try:
        import uvloop  # type: ignore[import-not-found]

        uvloop.install()
    except ImportError:
        pass
    result = asyncio.run(
        run(a.url, a.mode, a.key, a.connections, a.duration, a.task_id, a.create_every, body, a.timeout)
    )
    print("BENCH_JSON " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
