"""The one ASGI middleware (gateway/middleware.py), in process: `create_app` behind
`httpx.ASGITransport`, a SQLite store in tmp_path, no server and no upstream (its base_url
is a port nothing listens on; no test here reaches it).

What it owes every request: an `x-request-id` (the caller's when safe, a new one when
not), 413 for a body over `max_body_bytes` whether declared or streamed, the
x-ratelimit headers of an admitted tenant request, and one access-log line naming the
client, which behind a trusted proxy is the nearest X-Forwarded-For hop not trusted.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from inprocess import AUTH, KEY, Running, gateway_config, running

from gateway.auth import key_hash
from gateway.config import Config
from gateway.directory import config_key_id

MAX_BODY = 1024


def make_config(tmp_path: Path, **server: object) -> Config:
    """`requests_per_minute = 3` (a token every 20 s) and a 1 KiB body limit."""
    return gateway_config(tmp_path, {"max_body_bytes": MAX_BODY, **server}, {"requests_per_minute": 3})


# --- x-request-id --------------------------------------------------------------------------


async def test_a_safe_request_id_is_kept_and_logged(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as run, run.client() as client:
        resp = await client.get("/healthz", headers={"x-request-id": "trace-abc.123:7_x"})
        assert resp.status_code == 200 and resp.headers["x-request-id"] == "trace-abc.123:7_x"
        assert (await run.line_of("trace-abc.123:7_x"))["route"] == "/healthz"


@pytest.mark.parametrize("given", ["bad id with spaces", "a/b", "x" * 129, "", "ünïcode"])
async def test_an_unsafe_request_id_is_replaced(tmp_path: Path, given: str) -> None:
    async with running(make_config(tmp_path)) as run, run.client() as client:
        resp = await client.get("/healthz", headers=[(b"x-request-id", given.encode())])
        replaced = resp.headers["x-request-id"]
        assert replaced != given and re.fullmatch(r"req_[0-9a-f]{32}", replaced)
        assert (await run.line_of(replaced))["status"] == 200  # the log line names the id the client got


async def test_every_answer_has_a_request_id_even_an_error(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as run, run.client() as client:
        first, second = await client.get("/no/such/route"), await client.get("/runway/tasks")
        assert first.status_code == 404 and second.status_code == 401
        ids = {first.headers["x-request-id"], second.headers["x-request-id"]}
        assert len(ids) == 2 and all(i.startswith("req_") for i in ids)


# --- body size -----------------------------------------------------------------------------


async def test_a_declared_length_over_the_limit_is_413_before_anything_else(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as run, run.client() as client:
        # no credentials: the size is refused before authentication reads anything
        resp = await client.post("/runway/tasks", content=b"x" * (MAX_BODY + 1))
        assert resp.status_code == 413
        assert resp.json()["error"]["code"] == "request_too_large" and resp.headers["x-request-id"].startswith("req_")
        assert (await run.line_of(resp.headers["x-request-id"]))["status"] == 413


async def chunks(total: int, size: int = 256) -> AsyncIterator[bytes]:
    """A body without Content-Length (chunked): only counting the bytes can refuse it."""
    sent = 0
    while sent < total:
        piece = b" " * min(size, total - sent)
        sent += len(piece)
        yield piece


async def test_a_streamed_body_over_the_limit_is_413(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as run, run.client() as client:
        resp = await client.post("/runway/tasks", headers=AUTH, content=chunks(MAX_BODY + 1))
        assert "content-length" not in resp.request.headers
        assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"
        # exactly the limit is read whole and reaches the route (which finds it no JSON)
        resp = await client.post("/runway/tasks", headers=AUTH, content=chunks(MAX_BODY))
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_json"


# --- rate-limit headers --------------------------------------------------------------------


async def test_an_admitted_request_carries_the_rate_headers(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as run, run.client() as client:
        names = ("limit", "remaining", "reset")
        seen = []
        for _ in range(4):
            resp = await client.get("/runway/tasks", headers=AUTH)
            seen.append((resp.status_code, *(resp.headers.get(f"x-ratelimit-{n}-requests") for n in names)))
        # 3 per minute: a token every 20 s, and the clock does not move
        assert seen == [
            (200, "3", "2", "20s"),
            (200, "3", "1", "40s"),
            (200, "3", "0", "1m0s"),
            (429, "3", "0", "1m0s"),
        ]
        assert resp.headers["retry-after"] == "20"
        unauthenticated = await client.get("/runway/tasks")
        assert unauthenticated.status_code == 401 and "x-ratelimit-limit-requests" not in unauthenticated.headers
        assert (await run.line_of(resp.headers["x-request-id"]))["tenant"] == "team-a"
        assert (await run.line_of(unauthenticated.headers["x-request-id"]))["tenant"] is None


# --- the client address behind trusted proxies ----------------------------------------------


async def client_ip(run: Running, peer: str, forwarded: str | None) -> str | None:
    headers = {"x-forwarded-for": forwarded} if forwarded is not None else {}
    async with run.client(peer) as client:
        resp = await client.get("/healthz", headers=headers)
    logged: str | None = (await run.line_of(resp.headers["x-request-id"]))["client"]
    return logged


@pytest.mark.parametrize(
    ("peer", "forwarded", "logged"),
    [
        ("10.0.0.5", "203.0.113.7", "203.0.113.7"),  # one trusted proxy in front
        ("10.0.0.5", "203.0.113.7, 10.0.0.9", "203.0.113.7"),  # two: the nearest untrusted hop
        ("10.0.0.5", "198.51.100.1, 203.0.113.7, 10.0.0.9", "203.0.113.7"),  # what the client wrote is not believed
        ("10.0.0.5", "198.51.100.1,203.0.113.7", "203.0.113.7"),  # no spaces
        ("10.0.0.5", "10.0.0.8, 10.0.0.9", "10.0.0.5"),  # every hop trusted: the peer
        ("10.0.0.5", None, "10.0.0.5"),  # a trusted peer without the header
        ("192.0.2.1", "203.0.113.7", "192.0.2.1"),  # an untrusted peer's header is ignored
        ("2001:db8::1", "203.0.113.7", "203.0.113.7"),  # IPv6 networks too
        ("10.0.0.5", "203.0.113.7, unknown", "10.0.0.5"),  # a hop that is no address: the peer
        ("10.0.0.5", "evil.example", "10.0.0.5"),
        ("10.0.0.5", "203.0.113.7:443", "10.0.0.5"),
    ],
)
async def test_the_client_is_the_nearest_untrusted_hop(
    tmp_path: Path, peer: str, forwarded: str | None, logged: str
) -> None:
    config = make_config(tmp_path, trusted_proxies=["10.0.0.0/8", "2001:db8::/32"])
    async with running(config) as run:
        assert await client_ip(run, peer, forwarded) == logged


async def test_without_trusted_proxies_the_header_is_ignored(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as run:
        assert await client_ip(run, "10.0.0.5", "203.0.113.7") == "10.0.0.5"


# --- the access-log line ----------------------------------------------------------------------


async def test_the_access_line_has_the_request_fields(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as run, run.client("192.0.2.44") as client:
        resp = await client.get("/runway/tasks/no-such-task", headers={**AUTH, "x-request-id": "line-1"})
        assert resp.status_code == 404
        line = await run.line_of("line-1")
        duration = line.pop("duration_ms")
        assert isinstance(duration, float) and duration >= 0
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line.pop("time"))
        assert line == {
            "level": "info",
            "logger": "gateway.access",
            "request_id": "line-1",
            "client": "192.0.2.44",
            "tenant": "team-a",
            "key_id": config_key_id(key_hash(KEY)),  # which key, never the key
            "method": "GET",
            "route": "/runway/tasks/{id}",
            "status": 404,
        }
        # a path no route matches is logged as `unmatched`, never as the raw path
        await client.get("/secret-looking/path", headers={"x-request-id": "line-2"})
        assert (await run.line_of("line-2"))["route"] == "unmatched"
        assert "secret-looking" not in run.log.getvalue()
