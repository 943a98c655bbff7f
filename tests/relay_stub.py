"""Canned answers of contract §14's `GET /admin/v1/relays` and of the usage ledger grouped
by relay, and a real HTTP server (Starlette on uvicorn, in a thread) that answers them.

For the operator surfaces (`admin relays`, the console's Relays page and usage by relay)
on a branch whose gateway does not serve those routes yet: the tests use the live gateway
when it answers them, and this otherwise (see `live_answers`).
"""

from __future__ import annotations

import csv
import io
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import httpx
import uvicorn
from conftest import free_port, wait_until
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

V1 = "/admin/v1"
GROUP_FIELDS = {"day": "date", "tenant": "tenant", "key": "key_id", "relay": "relay"}
COUNTERS = ("tasks_created", "tasks_succeeded", "tasks_failed", "credits_charged", "credits_refunded")


def canned_relays(now: float | None = None) -> dict[str, Any]:
    """§14's list with one relay in each state (and a drained one); `failovers` is the
    extra count the gateway adds to each relay."""
    t = int(now if now is not None else time.time())
    relays = [
        ("chatgptsb", "api.chatgptsb.com", 0, 3, True, "closed", None, (2, 0), None, 0),
        ("backup", "relay-b.example", 0, 1, True, "open", t + 25, (1, 0), "http 503", 7),
        ("cheap", "relay-c.example", 1, 1, True, "cooling", t + 40, (2, 1), "http 429", 3),
        ("probe", "relay-d.example", 1, 2, True, "half_open", None, (1, 0), "ConnectError", 1),
        ("old", "relay-old.example", 2, 1, False, "closed", None, (1, 0), None, 0),
    ]
    return {
        "object": "list",
        "data": [
            {
                "object": "relay",
                "id": rid,
                "host": host,
                "priority": priority,
                "weight": weight,
                "enabled": enabled,
                "state": state,
                "until": until,
                "keys": {"total": total, "refused": refused},
                "last_error": last_error,
                "failovers": failovers,
            }
            for rid, host, priority, weight, enabled, state, until, (total, refused), last_error, failovers in relays
        ],
    }


def canned_ledger(day: str) -> list[dict[str, Any]]:
    """Full ledger rows (every group field) of one day: two tenants over two relays."""
    rows = [
        ("search-team", "key_aaa", "chatgptsb", 12, 10, 1, 120, 10),
        ("search-team", "key_aaa", "backup", 5, 5, 0, 50, 0),
        ("video-team", "key_bbb", "chatgptsb", 3, 2, 1, 30, 10),
    ]
    return [
        {"date": day, "tenant": t, "key_id": k, "relay": r, **dict(zip(COUNTERS, counts, strict=True))}
        for t, k, r, *counts in rows
    ]


def group(rows: list[dict[str, Any]], parts: list[str]) -> list[dict[str, Any]]:
    """The ledger's sums per group, only the grouped fields kept (as §10's report does)."""
    fields = [GROUP_FIELDS[p] for p in GROUP_FIELDS if p in parts]
    sums: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in rows:
        key = tuple(row[f] for f in fields)
        out = sums.setdefault(key, {**{f: row[f] for f in fields}, **dict.fromkeys(COUNTERS, 0)})
        for c in COUNTERS:
            out[c] += row[c]
    return [sums[k] for k in sorted(sums)]


def usage_report(day: str, q: dict[str, str]) -> tuple[int, str, str]:
    """GET /admin/v1/usage over `canned_ledger(day)`: (status, content type, body), JSON or
    CSV as §10 answers it, honouring from, to, tenant, group_by and format."""
    parts = q.get("group_by", "day,tenant").split(",")
    if not set(parts) <= GROUP_FIELDS.keys():
        message = "`group_by` must be one or more of day, tenant, key, relay."
        body = {
            "error": {"message": message, "type": "invalid_request_error", "param": "group_by", "code": "invalid_value"}
        }
        return 400, "application/json", json.dumps(body)
    rows = [
        r
        for r in canned_ledger(day)
        if q.get("from", day) <= r["date"] <= q.get("to", day) and q.get("tenant", r["tenant"]) == r["tenant"]
    ]
    data = group(rows, parts)
    if q.get("format") == "csv":
        out = io.StringIO()
        fields = [GROUP_FIELDS[p] for p in GROUP_FIELDS if p in parts] + list(COUNTERS)
        writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(data)
        return 200, "text/csv; charset=utf-8", out.getvalue()
    return 200, "application/json", json.dumps({"object": "list", "data": data, "has_more": False})


def error(status: int, message: str, code: str, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


class RelayStub:
    """The two admin routes on a free port; records each request's path and query."""

    def __init__(self, admin_key: str):
        self.admin_key = admin_key
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.day = datetime.now(UTC).date().isoformat()
        self.now = time.time()  # the relays' `until` count from here, the same in every answer
        app = Starlette(routes=[Route(f"{V1}/relays", self._relays), Route(f"{V1}/usage", self._usage)])
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def _authorized(self, request: Request) -> bool:
        self.requests.append((request.url.path, dict(request.query_params)))
        return request.headers.get("authorization") == f"Bearer {self.admin_key}"

    async def _relays(self, request: Request) -> Response:
        if not self._authorized(request):
            return error(401, "Invalid admin API key.", "invalid_api_key")
        return JSONResponse(canned_relays(self.now))

    async def _usage(self, request: Request) -> Response:
        if not self._authorized(request):
            return error(401, "Invalid admin API key.", "invalid_api_key")
        status, media_type, body = usage_report(self.day, dict(request.query_params))
        return Response(body, status_code=status, media_type=media_type)

    def start(self) -> None:
        self._thread.start()
        wait_until(lambda: self._server.started, 10, 0.02, "the relay stub server")

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


@contextmanager
def relay_stub(admin_key: str) -> Iterator[RelayStub]:
    stub = RelayStub(admin_key)
    stub.start()
    try:
        yield stub
    finally:
        stub.stop()


def live_answers(base_url: str, admin_key: str, path: str, **params: str) -> bool:
    """Whether the live gateway serves a §14 surface: True on 200; False when the route is
    absent (404) or `group_by=relay` unknown (400 naming `group_by`), i.e. the branch with
    the relays core is not merged yet. Anything else fails the test."""
    resp = httpx.get(base_url + V1 + path, params=params, headers={"Authorization": f"Bearer {admin_key}"}, timeout=10)
    if resp.status_code == 200:
        return True
    absent = resp.status_code == 404 or (resp.status_code == 400 and resp.json()["error"]["param"] == "group_by")
    assert absent, (path, resp.status_code, resp.text)
    return False
