"""The usage ledger through real gateways: GET /admin/v1/usage after racing creates that
end every way a create can (refused, failed upstream, FAILED and refunded, SUCCEEDED).

Redis: two gateway processes sharing a private Redis. SQLite: one gateway with
`--workers 2`, which also takes JWTs (a JWT's rows have `key_id` null). The booking rules
one by one, with a moved clock, are in test_store_contract.py.
"""

from __future__ import annotations

import csv
import io
import itertools
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from conftest import ADMIN_KEY, GatewayProcess, Simulator, TenantSpec, gen2_body, wait_until

from gateway.store.base import Charge, LedgerRow, Limits, TaskRecord
from gateway.store.rules import day_key, month_key
from gateway.store.sqlite import SQLiteStore
from gateway.usage import UsageQuery, group, parse_query, to_csv

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
JWT_SECRET = "usage-ledger-test-jwt-secret-0123456789abcdef"
N, K = 12, 6  # tasks_per_day of each tenant; creates beyond it
PRICES = {False: 10, True: 15}  # gen2, gen2 + upscale (the default pricing)
COUNTERS = ("tasks_created", "tasks_succeeded", "tasks_failed", "credits_charged", "credits_refunded")


@dataclass
class Caller:
    """Who sends creates: a tenant and the bearer credential of one of its keys (or a JWT),
    with the key id the ledger should name (None for the JWT)."""

    tenant: str
    credential: str
    key_id: str | None


@dataclass
class Sent:
    caller: Caller
    upscale: bool
    status: int
    task_id: str | None


def today() -> str:
    return datetime.now(UTC).date().isoformat()


def usage_report(g: GatewayProcess, **params: str) -> httpx.Response:
    return httpx.get(f"{g.url}/admin/v1/usage", params=params, headers=ADMIN, timeout=10)


def rows(g: GatewayProcess, **params: str) -> list[dict[str, Any]]:
    resp = usage_report(g, **params)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "list" and body["has_more"] is False
    return list(body["data"])


def config_key_id(g: GatewayProcess, tenant: str) -> str:
    keys = httpx.get(f"{g.url}/admin/v1/tenants/{tenant}/keys", headers=ADMIN, timeout=10).json()["data"]
    return str(next(k["id"] for k in keys if k["source"] == "config"))


def mint_key(g: GatewayProcess, tenant: str) -> tuple[str, str]:
    resp = httpx.post(f"{g.url}/admin/v1/tenants/{tenant}/keys", json={"name": "second"}, headers=ADMIN, timeout=10)
    assert resp.status_code == 201, resp.text
    return resp.json()["id"], resp.json()["secret"]


def callers(gws: list[GatewayProcess], jwt_tenant: str | None = None) -> list[Caller]:
    """alpha: its config key and a minted one; beta: its config key; and a JWT for
    `jwt_tenant` when given. The minted key must authenticate on every process first."""
    g = gws[0]
    key_id, secret = mint_key(g, "alpha")
    out = [
        Caller("alpha", g.tenants["alpha"].key, config_key_id(g, "alpha")),
        Caller("alpha", secret, key_id),
        Caller("beta", g.tenants["beta"].key, config_key_id(g, "beta")),
    ]
    if jwt_tenant is not None:
        token = jwt.encode({"tenant": jwt_tenant, "exp": int(time.time()) + 600}, JWT_SECRET, algorithm="HS256")
        out.append(Caller(jwt_tenant, token, None))
    wait_until(
        lambda: all(
            httpx.get(f"{gw.url}/runway/tasks", headers={"Authorization": f"Bearer {secret}"}).status_code == 200
            for gw in gws
            for _ in range(6)
        ),
        5,
        message="the minted key authenticates on every worker",
    )
    return out


def burst(gws: list[GatewayProcess], plan: list[tuple[Caller, bool]]) -> list[Sent]:
    """Every create of `plan` released at once from its own thread, spread over `gws`."""
    barrier = threading.Barrier(len(plan))
    targets = itertools.cycle(gws)
    urls = [next(targets).url for _ in plan]

    def one(i: int) -> Sent:
        caller, upscale = plan[i]
        headers = {"Authorization": f"Bearer {caller.credential}"}
        with httpx.Client(base_url=urls[i], headers=headers, timeout=30) as c:
            barrier.wait()
            resp = c.post("/runway/tasks", json=gen2_body(f"ledger {i}", upscale=upscale))
        task_id = resp.json()["task"]["id"] if resp.status_code == 200 else None
        return Sent(caller, upscale, resp.status_code, task_id)

    with ThreadPoolExecutor(len(plan)) as pool:
        return list(pool.map(one, range(len(plan))))


def race_and_check(gws: list[GatewayProcess], sim: Simulator, everyone: list[Caller]) -> None:
    """N + K creates per tenant at once, with the upstream failing some creates (refunded:
    no trace) and some tasks (FAILED: refunded), then: the ledger per tenant and key equals
    what the simulator saw and what the gateway answered, and per tenant it equals the
    quota counters."""
    sim.reset()
    # the upstream answers creates after 1 s: every admission of the burst happens first
    sim.control(latency_seconds=1.0, create_fail_rate=0.3, fail_rate=0.4, seconds_to_finish=0.5)
    names = {c.tenant for c in everyone}
    plan: list[tuple[Caller, bool]] = []
    for tenant in names:
        mine = itertools.cycle([c for c in everyone if c.tenant == tenant])
        plan += [(next(mine), i % 3 == 0) for i in range(N + K)]
    sent = burst(gws, plan)
    statuses = Counter(s.status for s in sent)
    assert set(statuses) <= {200, 429, 502}, statuses
    for tenant in names:
        assert sum(s.status == 429 for s in sent if s.caller.tenant == tenant) == K
    created = [s for s in sent if s.status == 200]
    assert created and statuses[502] > 0  # the mix happened: tasks, and creates failed upstream

    def all_settled() -> bool:
        ends = {t["id"]: t["status"] for t in sim.tasks()}
        return (
            len(ends) == len(created)
            and all(ends[s.task_id] in ("SUCCEEDED", "FAILED") for s in created if s.task_id)
            and all(gws[0].usage(t)["active"] == 0 for t in names)
        )

    wait_until(all_settled, 30, 0.1, "every task ended and its callback applied")
    ends = {t["id"]: t["status"] for t in sim.tasks()}
    assert "FAILED" in ends.values() and "SUCCEEDED" in ends.values()

    expected: dict[tuple[str, str | None], Counter[str]] = {}
    for s in created:
        price = PRICES[s.upscale]
        c = expected.setdefault((s.caller.tenant, s.caller.key_id), Counter())
        c["tasks_created"] += 1
        c["credits_charged"] += price
        if ends[s.task_id or ""] == "FAILED":
            c["tasks_failed"] += 1
            c["credits_refunded"] += price
        else:
            c["tasks_succeeded"] += 1

    got = [r for r in rows(gws[-1], group_by="tenant,key", **{"from": today(), "to": today()}) if r["tenant"] in names]
    assert {(r["tenant"], r["key_id"]): {k: r[k] for k in COUNTERS} for r in got} == {
        key: {k: c[k] for k in COUNTERS} for key, c in expected.items()
    }
    for tenant in names:
        usage = gws[0].usage(tenant)
        mine = [r for r in got if r["tenant"] == tenant]
        assert sum(r["credits_charged"] - r["credits_refunded"] for r in mine) == usage["credits_today"]
        assert sum(r["tasks_created"] for r in mine) == usage["tasks_today"] == usage["tasks_this_month"]
        assert usage["tasks_today"] <= N
    by_day = [r for r in rows(gws[0]) if r["tenant"] in names]  # the defaults: day,tenant over 30 days
    assert [(r["date"], r["tenant"]) for r in by_day] == sorted((today(), t) for t in names)
    assert all("key_id" not in r for r in by_day)


def tenants() -> list[TenantSpec]:
    limits = {"tasks_per_day": N}
    return [TenantSpec("alpha", limits=limits), TenantSpec("beta", limits=limits), TenantSpec("gamma")]


@pytest.fixture(scope="module")
def sqlite_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, Simulator]]:
    """A gateway with `--workers 2` on one SQLite file, taking JWTs too, and its simulator."""
    tmp = tmp_path_factory.mktemp("ledger-sqlite")
    sim = Simulator(tmp, seconds_to_finish=0.5)
    sim.start()
    jwt_toml = f'[auth.jwt]\nalgorithms = ["HS256"]\nsecret = "{JWT_SECRET}"\n'
    g = GatewayProcess(tmp, sim.url, tenants(), workers=2, extra_toml=jwt_toml)
    g.start()
    yield g, sim
    g.stop()
    sim.stop()


def test_racing_creates_on_two_gateways_sharing_redis(tmp_path: Path, redis_store_url: str, own_sim: Simulator) -> None:
    specs = tenants()  # one set of keys for both processes
    gws = [GatewayProcess(tmp_path, own_sim.url, specs, store_url=redis_store_url) for _ in range(2)]
    try:
        for g in gws:
            g.start()
        race_and_check(gws, own_sim, callers(gws))
    finally:
        for g in gws:
            g.stop()


def test_racing_creates_on_sqlite_with_two_workers_and_a_jwt(sqlite_env: tuple[GatewayProcess, Simulator]) -> None:
    g, sim = sqlite_env
    everyone = callers([g], jwt_tenant="beta")
    assert None in {c.key_id for c in everyone}
    race_and_check([g], sim, everyone)
    assert any(r["key_id"] is None for r in rows(g, tenant="beta", group_by="key"))
    sim.reset()


def create_some(g: GatewayProcess, tenant: str, count: int) -> list[str]:
    ids = []
    with g.client(tenant) as c:
        for i in range(count):
            resp = c.post("/runway/tasks", json=gen2_body(f"some {i}", upscale=i % 2 == 1))
            assert resp.status_code == 200, resp.text
            ids.append(resp.json()["task"]["id"])
    return ids


def test_csv_has_a_header_and_the_same_rows_and_fields_not_grouped_are_omitted(
    sqlite_env: tuple[GatewayProcess, Simulator],
) -> None:
    g, sim = sqlite_env
    sim.control(seconds_to_finish=60)  # gamma's tasks stay running: only created and charged
    create_some(g, "gamma", 3)
    key = config_key_id(g, "gamma")
    span = {"from": (datetime.now(UTC).date() - timedelta(days=2)).isoformat(), "tenant": "gamma"}
    data = rows(g, group_by="key,day,tenant", **span)  # any order: rows still go date, tenant, key_id
    assert data == [
        {
            "date": today(),
            "tenant": "gamma",
            "key_id": key,
            "tasks_created": 3,
            "tasks_succeeded": 0,
            "tasks_failed": 0,
            "credits_charged": 35,
            "credits_refunded": 0,
        }
    ]
    assert rows(g, group_by="key", **span) == [{k: v for k, v in data[0].items() if k not in ("date", "tenant")}]
    assert rows(g, group_by="tenant", key_id=key, **span) == [
        {k: v for k, v in data[0].items() if k != "key_id" and k != "date"}
    ]
    assert rows(g, tenant="gamma", key_id="key_nobody") == []
    resp = usage_report(g, format="csv", group_by="day,tenant,key", **span)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/csv")
    table = list(csv.reader(io.StringIO(resp.text)))
    assert table[0] == ["date", "tenant", "key_id", *COUNTERS]
    assert table[1:] == [[str(v) for v in data[0].values()]]
    empty = usage_report(g, format="csv", tenant="nobody")
    assert list(csv.reader(io.StringIO(empty.text))) == [["date", "tenant", *COUNTERS]]
    shown = httpx.get(f"{g.url}/admin/v1/tenants/gamma", headers=ADMIN, timeout=10).json()["usage"]
    assert shown["tasks_this_month"] == shown["tasks_today"] == 3 and shown["credits_this_month"] == 35
    assert g.usage("gamma")["tasks_this_month"] == 3  # the older route too
    sim.reset()


@pytest.mark.parametrize(
    "params,param",
    [
        ({"from": "2026-13-01"}, "from"),
        ({"from": "yesterday"}, "from"),
        ({"from": "20260101"}, "from"),
        ({"to": "2026-02-30"}, "to"),
        ({"to": ""}, "to"),
        ({"from": "2026-03-02", "to": "2026-03-01"}, "from"),
        ({"from": "2025-01-01", "to": "2026-01-02"}, "from"),  # 367 days
        ({"to": "0001-01-05"}, "to"),  # no day 30 days before it
        ({"group_by": ""}, "group_by"),
        ({"group_by": "day,week"}, "group_by"),
        ({"group_by": "tenant,"}, "group_by"),
        ({"format": "xml"}, "format"),
    ],
)
def test_bad_parameters_are_400_with_param(
    sqlite_env: tuple[GatewayProcess, Simulator], params: dict[str, str], param: str
) -> None:
    g, _ = sqlite_env
    resp = usage_report(g, **params)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["code"] == "invalid_value"


def test_the_longest_range_and_admin_authentication(sqlite_env: tuple[GatewayProcess, Simulator]) -> None:
    g, _ = sqlite_env
    assert usage_report(g, **{"from": "2025-01-01", "to": "2026-01-01"}).status_code == 200  # 366 days
    assert httpx.get(f"{g.url}/admin/v1/usage", timeout=10).status_code == 401
    tenant = httpx.get(f"{g.url}/admin/v1/usage", headers=g.tenants["gamma"].headers(), timeout=10)
    assert tenant.status_code == 403


async def test_a_database_from_before_the_ledger_opens_and_books(tmp_path: Path) -> None:
    """An SQLite file whose tasks and quota tables predate `key_id` and `month_tasks`."""
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE quota (tenant TEXT PRIMARY KEY, rpm_tokens REAL, rpm_ts REAL NOT NULL DEFAULT 0,"
        " tpm_tokens REAL, tpm_ts REAL NOT NULL DEFAULT 0, active INTEGER NOT NULL DEFAULT 0,"
        " day TEXT NOT NULL DEFAULT '', day_tasks INTEGER NOT NULL DEFAULT 0, day_credits INTEGER NOT NULL DEFAULT 0,"
        " month TEXT NOT NULL DEFAULT '', month_credits INTEGER NOT NULL DEFAULT 0);"
        "CREATE TABLE tasks (rid TEXT PRIMARY KEY, tenant TEXT NOT NULL, task_id TEXT UNIQUE,"
        " key_index INTEGER NOT NULL DEFAULT 0, status TEXT NOT NULL, task TEXT NOT NULL DEFAULT '{}',"
        " hook TEXT NOT NULL DEFAULT '', task_type TEXT NOT NULL DEFAULT 'gen2', credits INTEGER NOT NULL DEFAULT 0,"
        " charge_day TEXT NOT NULL DEFAULT '', charge_month TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL,"
        " updated_at REAL NOT NULL, active INTEGER NOT NULL DEFAULT 1, settled INTEGER NOT NULL DEFAULT 0,"
        " timed_out INTEGER NOT NULL DEFAULT 0, deleted INTEGER NOT NULL DEFAULT 0,"
        " next_poll_at REAL NOT NULL DEFAULT 0, meta TEXT NOT NULL DEFAULT '{}');"
        "INSERT INTO tasks (rid, tenant, task_id, status, created_at, updated_at) VALUES ('old', 't', 'x', 'RUNNING', 1, 1);"
    )
    old.close()

    store = SQLiteStore(str(path))
    await store.open()
    try:
        assert (await store.get_by_rid("old")).key_id is None  # type: ignore[union-attr]
        now = time.time()
        rec = TaskRecord(rid="new", tenant_id="t", credits=10, created_at=now, updated_at=now, key_id="key_x")
        assert (await store.admit_create("t", Limits(), Charge(10, day_key(now), month_key(now)), rec, now)).ok
        assert (await store.get_by_rid("new")).key_id == "key_x"  # type: ignore[union-attr]
        assert (await store.usage("t", now)).tasks_this_month == 1
        assert [(r.key_id, r.tasks_created) for r in await store.ledger(day_key(now), day_key(now))] == [("key_x", 1)]
    finally:
        await store.close()


def test_grouping_sums_over_what_is_not_grouped_by() -> None:
    ledger = [
        LedgerRow("2026-01-01", "a", None, tasks_created=1, credits_charged=10),
        LedgerRow("2026-01-01", "a", "key_2", tasks_created=2, credits_charged=20, tasks_failed=1, credits_refunded=10),
        LedgerRow("2026-01-01", "b", "key_1", tasks_created=4, credits_charged=40),
        LedgerRow("2026-01-02", "a", "key_2", tasks_succeeded=2),
    ]
    assert group(ledger, ("tenant",)) == [
        {
            "tenant": "a",
            "tasks_created": 3,
            "tasks_succeeded": 2,
            "tasks_failed": 1,
            "credits_charged": 30,
            "credits_refunded": 10,
        },
        {
            "tenant": "b",
            "tasks_created": 4,
            "tasks_succeeded": 0,
            "tasks_failed": 0,
            "credits_charged": 40,
            "credits_refunded": 0,
        },
    ]
    assert [(r["key_id"], r["tasks_created"], r["tasks_succeeded"]) for r in group(ledger, ("key",))] == [
        (None, 1, 0),
        ("key_1", 4, 0),
        ("key_2", 2, 2),
    ]
    by_day = group(ledger, ("day",))
    assert [(r["date"], r["credits_charged"]) for r in by_day] == [("2026-01-01", 70), ("2026-01-02", 0)]
    query = UsageQuery("2026-01-01", "2026-01-02", group_by=("day", "key"), format="csv")
    assert to_csv(group(ledger, query.group_by), query).splitlines()[:2] == [
        "date,key_id,tasks_created,tasks_succeeded,tasks_failed,credits_charged,credits_refunded",
        "2026-01-01,,1,0,0,10,0",
    ]
    defaults = parse_query({}, datetime(2026, 3, 1, 0, 30, tzinfo=UTC).timestamp())
    assert (defaults.from_day, defaults.to_day, defaults.group_by, defaults.format) == (
        "2026-01-30",
        "2026-03-01",
        ("day", "tenant"),
        "json",
    )
    assert parse_query({"group_by": " key , day,key"}, 0).group_by == ("day", "key")


def test_csv_neutralises_cells_a_spreadsheet_would_compute(sqlite_env: tuple[GatewayProcess, Simulator]) -> None:
    """A tenant id like `-1-1` (ids may start with `-`) is a formula to Excel: the CSV
    writes it as `'-1-1` (OWASP's rule); the counters stay plain numbers."""
    g, _ = sqlite_env
    made = httpx.post(f"{g.url}/admin/v1/tenants", json={"id": "-1-1"}, headers=ADMIN, timeout=10)
    assert made.status_code == 201, made.text
    key = httpx.post(f"{g.url}/admin/v1/tenants/-1-1/keys", json={"name": "=cmd"}, headers=ADMIN, timeout=10)
    assert key.status_code == 201, key.text
    secret = key.json()["secret"]

    def create() -> int:
        headers = {"Authorization": f"Bearer {secret}"}
        return httpx.post(f"{g.url}/runway/tasks", json=gen2_body("csv"), headers=headers, timeout=10).status_code

    wait_until(lambda: create() == 200, timeout=5)
    resp = usage_report(g, format="csv", tenant="-1-1", group_by="tenant")
    assert resp.status_code == 200, resp.text
    table = list(csv.reader(io.StringIO(resp.text)))
    assert table == [["tenant", *COUNTERS], ["'-1-1", "1", "0", "0", "10", "0"]]


@pytest.mark.parametrize("text", ["=1+1", "+1", "-1-1", "@SUM(A1)", "\tx", "\rx"])
def test_csv_cells_starting_a_formula_get_a_quote(text: str) -> None:
    ledger = [LedgerRow("2026-01-01", text, text, tasks_created=3, credits_charged=30)]
    query = UsageQuery("2026-01-01", "2026-01-01", group_by=("tenant", "key"), format="csv")
    table = list(csv.reader(io.StringIO(to_csv(group(ledger, query.group_by), query))))
    assert table[1] == ["'" + text, "'" + text, "3", "0", "0", "30", "0"]
    plain = UsageQuery("2026-01-01", "2026-01-01", group_by=("tenant",), format="csv")
    safe = [LedgerRow("2026-01-01", "a-1", None, tasks_created=1)]
    assert list(csv.reader(io.StringIO(to_csv(group(safe, plain.group_by), plain))))[1][0] == "a-1"
