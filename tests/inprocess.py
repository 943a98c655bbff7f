"""A gateway in this test's own event loop: `create_app(config)` inside its lifespan, called
through `httpx.ASGITransport`. No server, no process: for what the middleware, the routes
and the app's wiring do with one request, where a real uvicorn adds only time.

The store is SQLite in the test's tmp_path; the upstream's base_url is a port nothing
listens on (a create gets 503 upstream_unavailable at once, and the circuit counts it).
The clock is fixed unless the test gives one, so token-bucket numbers are exact.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
from conftest import ADMIN_KEY, eventually, free_port, key_hash
from starlette.applications import Starlette

from gateway.app import create_app
from gateway.config import Config, parse_config
from gateway.logs import ACCESS_LOGGER

KEY = "sk-gw-inprocess-test-4b1d0e"
AUTH = {"Authorization": f"Bearer {KEY}"}
T0 = 1_800_000_000.0


def gateway_config(
    tmp_path: Path, server: dict[str, Any] | None = None, limits: dict[str, int] | None = None
) -> Config:
    """One tenant, `team-a`, whose key is KEY, and conftest's ADMIN_KEY; `server` and `limits`
    as in the TOML file."""
    raw = {
        "server": server or {},
        "upstream": {"base_url": f"http://127.0.0.1:{free_port()}", "api_keys": ["sk-upstream"]},
        "store": {"url": f"sqlite:///{tmp_path / 'gateway.db'}"},
        "admin": {"keys": [key_hash(ADMIN_KEY)]},
        "tenants": [{"id": "team-a", "keys": [key_hash(KEY)], "limits": limits or {}}],
    }
    return parse_config(raw, environ={}, base_dir=tmp_path)


class Running:
    """An app inside its lifespan, its access log captured."""

    def __init__(self, app: Starlette, log: io.StringIO):
        self.app, self.log = app, log

    def client(self, peer: str = "127.0.0.1") -> httpx.AsyncClient:
        """A client whose requests come from `peer` (the ASGI scope's `client`)."""
        transport = httpx.ASGITransport(app=self.app, client=(peer, 40000))
        return httpx.AsyncClient(transport=transport, base_url="http://gateway.test")

    async def usage(self, tenant: str = "team-a") -> dict[str, int]:
        async with self.client() as client:
            resp = await client.get(f"/admin/tenants/{tenant}/usage", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert resp.status_code == 200, resp.text
        usage: dict[str, int] = resp.json()["usage"]
        return usage

    async def line_of(self, request_id: str) -> dict[str, Any]:
        """The request's one access-log line (lines go out at the end of a loop turn)."""

        def lines() -> list[dict[str, Any]]:
            every = [orjson.loads(line) for line in self.log.getvalue().splitlines()]
            return [line for line in every if line.get("request_id") == request_id]

        found: list[dict[str, Any]] = await eventually(lines, message=f"the access line of {request_id}")
        assert len(found) == 1, self.log.getvalue()
        return found[0]


@contextlib.asynccontextmanager
async def running(config: Config, clock: Callable[[], float] = lambda: T0) -> AsyncIterator[Running]:
    log = io.StringIO()
    access = logging.getLogger(ACCESS_LOGGER)
    level = access.level
    access.setLevel(logging.INFO)  # as `serve` sets it up
    try:
        with contextlib.redirect_stdout(log):  # the access log writes to the stdout it is built with
            app = create_app(config, clock=clock, background=False)
        async with app.router.lifespan_context(app):
            yield Running(app, log)
    finally:
        access.setLevel(level)
