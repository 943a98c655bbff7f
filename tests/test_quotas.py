"""Quotas that hold exactly, through real servers.

SQLite: one gateway with `--workers 2` on one file. Redis: two gateway processes sharing
one Redis, requests split between them. Day/month roll-over and the token-bucket maths
with a moved clock are in test_store_contract.py (an injectable clock, no sleeping).
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import GatewayProcess, Simulator, TenantSpec, free_port, gen2_body, wait_until

from gateway.quotas import format_duration

N, K = 5, 10
LIMITED = {
    "rpm": {"requests_per_minute": N},
    "tpm": {"tasks_per_minute": N},
    "active": {"max_active_tasks": N},
    "tpd": {"tasks_per_day": N},
    "cpd": {"credits_per_day": N * 10},
    "cpm": {"credits_per_month": N * 10},
}
CODES = {
    "rpm": "rate_limit_exceeded",
    "tpm": "rate_limit_exceeded",
    "active": "concurrency_limit_exceeded",
    "tpd": "insufficient_quota",
    "cpd": "insufficient_quota",
    "cpm": "insufficient_quota",
}


@pytest.fixture(params=["sqlite", "redis"])
def replicas(request, tmp_path_factory, own_sim: Simulator) -> Iterator[list[GatewayProcess]]:
    """Gateways sharing one store: SQLite with 2 workers, or 2 processes on one Redis."""
    own_sim.control(seconds_to_finish=60)  # tasks stay active during the test
    tmp = tmp_path_factory.mktemp(request.param)
    tenants = [TenantSpec(name, limits=limits) for name, limits in LIMITED.items()]
    tenants.append(TenantSpec("seq", limits={"requests_per_minute": 5, "tasks_per_day": 2}))
    tenants.append(TenantSpec("hdr", limits={"requests_per_minute": 3}))
    tenants.append(TenantSpec("refund", limits={"tasks_per_day": 10, "credits_per_day": 100}))
    if request.param == "sqlite":
        gws = [GatewayProcess(tmp, own_sim.url, tenants, workers=2)]
    else:
        url = request.getfixturevalue("redis_store_url")
        gws = [GatewayProcess(tmp, own_sim.url, tenants, store_url=url) for _ in range(2)]
    for g in gws:
        g.start()
    yield gws
    for g in gws:
        g.stop()


def burst(gws: list[GatewayProcess], tenant: str, count: int) -> list[httpx.Response]:
    """`count` creates released at once from as many threads, spread over the replicas,
    each on a fresh connection (so uvicorn spreads them over its workers too)."""
    barrier = threading.Barrier(count)
    targets = itertools.cycle(gws)
    plan = [next(targets) for _ in range(count)]

    def one(i: int) -> httpx.Response:
        g = plan[i]
        with httpx.Client(base_url=g.url, headers=g.tenants[tenant].headers(), timeout=20) as c:
            barrier.wait()
            return c.post("/runway/tasks", json=gen2_body(f"race {i}"))

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


@pytest.mark.parametrize("tenant", list(LIMITED))
def test_n_plus_k_at_once_admits_exactly_n(replicas: list[GatewayProcess], own_sim: Simulator, tenant: str) -> None:
    before = own_sim.requests()["creates_total"]
    answers = burst(replicas, tenant, N + K)
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200] * N + [429] * K, [a.text for a in answers if a.status_code not in (200, 429)]
    assert own_sim.requests()["creates_total"] - before == N
    for a in answers:
        if a.status_code == 429:
            assert a.json()["error"]["code"] == CODES[tenant]
            assert int(a.headers["retry-after"]) >= 1
            assert tenant_limit_name(tenant) in a.json()["error"]["message"]
    usage = replicas[0].usage(tenant)
    assert usage["tasks_today"] == N and usage["credits_today"] == N * 10 and usage["active"] == N


def tenant_limit_name(tenant: str) -> str:
    return next(iter(LIMITED[tenant]))


def test_rejections_change_no_counter(replicas: list[GatewayProcess]) -> None:
    g = replicas[0]
    with g.client("seq") as c:
        assert [c.post("/runway/tasks", json=gen2_body()).status_code for _ in range(2)] == [200, 200]
        refused = [c.post("/runway/tasks", json=gen2_body()) for _ in range(3)]
        assert {r.json()["error"]["code"] for r in refused} == {"insufficient_quota"}
        assert c.post("/runway/tasks", json={"taskType": "nope"}).status_code == 400
        # 5 requests per minute: 2 creates took 2; the 3 refusals and the 400 took nothing
        assert [c.get("/runway/tasks").status_code for _ in range(3)] == [200, 200, 200]
        last = c.get("/runway/tasks")
        assert last.status_code == 429 and last.json()["error"]["code"] == "rate_limit_exceeded"
    assert g.usage("seq") == {
        "active": 2,
        "tasks_today": 2,
        "credits_today": 20,
        "credits_this_month": 20,
        "tasks_this_month": 2,
    }


def test_rate_limit_headers_are_exact(replicas: list[GatewayProcess]) -> None:
    g = replicas[0]
    with g.client("hdr") as c:
        seen = []
        start = time.monotonic()
        for _ in range(4):
            r = c.get("/runway/tasks")
            seen.append(
                (
                    r.status_code,
                    r.headers["x-ratelimit-limit-requests"],
                    r.headers["x-ratelimit-remaining-requests"],
                    r.headers["x-ratelimit-reset-requests"],
                    r.headers.get("retry-after"),
                )
            )
        late = math.ceil(time.monotonic() - start)  # the bucket refills meanwhile: 1 s -> 1 s less
    assert [s[:3] for s in seen] == [(200, "3", "2"), (200, "3", "1"), (200, "3", "0"), (429, "3", "0")]

    def around(seconds: int) -> set[str]:
        return {format_duration(seconds - k) for k in range(late + 1)}

    assert seen[0][3:] == ("20s", None)  # the first request's own clock: exact
    assert seen[1][3] in around(40) and seen[2][3] in around(60) and seen[3][3] in around(60), seen
    assert seen[1][4] is None and seen[2][4] is None and seen[3][4] in {str(20 - k) for k in range(late + 1)}, seen


@pytest.mark.parametrize(
    "misbehaviour,status",
    [({"create_status": 500}, 502), ({"create_status": 429}, 503), ({"garbage": False, "latency_seconds": 5}, 504)],
)
def test_refunds_follow_what_the_upstream_did(
    replicas: list[GatewayProcess], own_sim: Simulator, misbehaviour: dict, status: int
) -> None:
    g = replicas[0]
    own_sim.control(**misbehaviour)
    with g.client("refund") as c:
        assert c.post("/runway/tasks", json=gen2_body(upscale=True)).status_code == status
    usage = g.usage("refund")
    if status == 504:  # sent, no answer: the outcome is unknown, the charge is kept
        assert usage == {
            "active": 1,
            "tasks_today": 1,
            "credits_today": 15,
            "credits_this_month": 15,
            "tasks_this_month": 1,
        }
    else:  # the upstream answered an error: it created nothing, everything back
        assert usage == {
            "active": 0,
            "tasks_today": 0,
            "credits_today": 0,
            "credits_this_month": 0,
            "tasks_this_month": 0,
        }


# UTC-11 and UTC+14: their dates are always a day apart, so at any moment at least one of
# them is not on the UTC date. West first: a store keeps the latest day it has seen, so a
# local-time day would show as the eastern gateway starting a fresh day.
FAR_ZONES = ("Pacific/Pago_Pago", "Pacific/Kiritimati")


def test_daily_budget_is_one_utc_day_for_gateways_in_any_timezone(tmp_path, sim: Simulator, start_gateway) -> None:
    """Budgets count UTC days whatever the host's timezone: two gateways on one store, in
    zones whose local dates differ, share one tasks_per_day budget, and the refusal waits
    for the next UTC midnight."""
    tenants = [TenantSpec("t", limits={"tasks_per_day": 1})]
    store_url = f"sqlite:///{tmp_path / 'shared.db'}"
    west, east = (start_gateway(sim.url, tenants, store_url=store_url, env={"TZ": zone}) for zone in FAR_ZONES)
    with west.client("t") as c:
        assert c.post("/runway/tasks", json=gen2_body()).status_code == 200
    with east.client("t") as c:
        sent = time.time()
        refused = c.post("/runway/tasks", json=gen2_body())
        answered = time.time()
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "insufficient_quota", refused.text
    # the seconds to the next UTC midnight, rounded up, at some moment between the two
    assert 86400 - answered % 86400 <= int(refused.headers["retry-after"]) <= 86400 - sent % 86400 + 1
    assert west.usage("t")["tasks_today"] == east.usage("t")["tasks_today"] == 1


def test_connection_refused_refunds(start_gateway) -> None:
    g = start_gateway(f"http://127.0.0.1:{free_port()}", [TenantSpec("t", limits={"tasks_per_day": 1})])
    with g.client("t") as c:
        for _ in range(3):
            assert c.post("/runway/tasks", json=gen2_body()).json()["error"]["code"] == "upstream_unavailable"
    assert g.usage("t") == {
        "active": 0,
        "tasks_today": 0,
        "credits_today": 0,
        "credits_this_month": 0,
        "tasks_this_month": 0,
    }


def test_failed_task_refunds_credits_once_and_frees_its_slot(sim: Simulator, start_gateway) -> None:
    own = start_gateway(sim.url, [TenantSpec("t", limits={"max_active_tasks": 1, "credits_per_day": 20})])
    sim.control(fail_rate=1.0, duplicate_callbacks=True)
    try:
        with own.client("t") as c:
            task_id = c.post("/runway/tasks", json=gen2_body()).json()["task"]["id"]
            wait_until(lambda: c.get(f"/runway/tasks/{task_id}").json()["task"]["status"] == "FAILED", 15)
            wait_until(lambda: own.usage("t")["active"] == 0, 5)
        assert own.usage("t")["credits_today"] == 0 and own.usage("t")["tasks_today"] == 1
    finally:
        sim.control(fail_rate=0.0, duplicate_callbacks=False)
