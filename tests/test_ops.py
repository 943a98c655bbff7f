"""Operations: metrics across workers, health and readiness, store outages."""

from __future__ import annotations

import re
import secrets
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import UPSTREAM_KEY, GatewayProcess, RedisServer, Simulator, TenantSpec, gen2_body, wait_until

CONTRACT_SERIES = {
    "gateway_requests_total": {"tenant", "route", "method", "status"},
    "gateway_request_duration_seconds": {"route", "method"},
    "gateway_upstream_requests_total": {"relay", "operation", "status"},  # `relay`: contract §14
    "gateway_upstream_request_duration_seconds": {"relay", "operation"},
    "gateway_relay_up": {"relay"},
    "gateway_relay_failovers_total": {"relay", "reason"},
    "gateway_auth_failures_total": {"reason"},
    "gateway_quota_rejections_total": {"tenant", "limit"},
    "gateway_tasks_created_total": {"tenant", "task_type"},
    "gateway_tasks_finished_total": {"tenant", "status"},
    "gateway_tasks_active": {"tenant"},
    "gateway_credits_charged_total": {"tenant"},
    "gateway_callbacks_received_total": {"result"},
    "gateway_webhook_deliveries_total": {"tenant", "result"},
    "gateway_webhook_pending": set(),
    "gateway_task_duration_seconds": {"task_type", "status"},
    "gateway_credits_refunded_total": {"tenant"},
    "gateway_callback_lag_seconds": set(),
    "gateway_build_info": {"version"},
    "gateway_upstream_auth_failures_total": {"key_index"},  # beyond the contract's table: refused relay keys
}
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> list[tuple[str, dict[str, str], float]]:
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        assert m, line
        samples.append((m.group(1), dict(LABEL.findall(m.group(2) or "")), float(m.group(3))))
    return samples


def base_name(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in CONTRACT_SERIES:
            return name[: -len(suffix)]
    return name


def test_first_scrape_has_every_series_with_zero_children(tmp_path: Path, sim: Simulator) -> None:
    g = GatewayProcess(tmp_path, sim.url, [TenantSpec("quiet")], workers=2)
    g.start()
    try:
        samples = parse(httpx.get(g.url + "/metrics").text)
    finally:
        g.stop()
    names = {base_name(n) for n, _, _ in samples}
    assert set(CONTRACT_SERIES) <= names
    for name, labels, _ in samples:
        if base_name(name) in CONTRACT_SERIES:
            assert set(labels) - {"le"} == CONTRACT_SERIES[base_name(name)], (name, labels)
    limits = {
        lbl["limit"] for n, lbl, _ in samples if n == "gateway_quota_rejections_total" and lbl["tenant"] == "quiet"
    }
    assert limits == {
        "requests_per_minute",
        "tasks_per_minute",
        "max_active_tasks",
        "tasks_per_day",
        "credits_per_day",
        "credits_per_month",
    }
    assert ("gateway_tasks_active", {"tenant": "quiet"}, 0.0) in samples


def test_counts_across_two_workers_and_no_sensitive_labels(tmp_path: Path, sim: Simulator) -> None:
    tenant = TenantSpec("multi", limits={"tasks_per_day": 3})
    g = GatewayProcess(tmp_path, sim.url, [tenant], workers=2)
    g.start()
    prompt = "orchid-metrics-prompt-5521"
    try:
        task_ids = []
        for _ in range(4):  # fresh connections so both workers serve some
            with g.client("multi") as c:
                r = c.post("/runway/tasks", json=gen2_body(prompt))
                if r.status_code == 200:
                    task_ids.append(r.json()["task"]["id"])
        for task_id in task_ids:
            for _ in range(5):
                with g.client("multi") as c:
                    assert c.get(f"/runway/tasks/{task_id}").status_code == 200
        for _ in range(2):
            assert httpx.get(g.url + "/runway/tasks", headers={"Authorization": "Bearer nope"}).status_code == 401
        wait_until(lambda: metric(g, "gateway_tasks_finished_total", tenant="multi", status="SUCCEEDED") == 3, 15)
        # Request counts are buffered per worker and flushed every second (metrics.FLUSH_SECONDS).
        counted = {
            ("/runway/tasks", "POST", "200"): 3,
            ("/runway/tasks", "POST", "429"): 1,
            ("/runway/tasks/{id}", "GET", "200"): 15,
            ("/runway/tasks", "GET", "401"): 2,
        }
        wait_until(
            lambda: all(
                metric(g, "gateway_requests_total", route=r, method=m, status=st) == n
                for (r, m, st), n in counted.items()
            ),
            5,
        )
        text = httpx.get(g.url + "/metrics").text
        samples = parse(text)
    finally:
        g.stop()
    assert len(task_ids) == 3

    def value(name: str, **labels: str) -> float:
        return sum(v for n, lbl, v in samples if n == name and all(lbl.get(k) == val for k, val in labels.items()))

    assert value("gateway_requests_total", tenant="multi", route="/runway/tasks", method="POST", status="200") == 3
    assert value("gateway_requests_total", tenant="multi", route="/runway/tasks", method="POST", status="429") == 1
    assert value("gateway_requests_total", tenant="multi", route="/runway/tasks/{id}", method="GET", status="200") == 15
    assert value("gateway_requests_total", tenant="", route="/runway/tasks", method="GET", status="401") == 2
    assert value("gateway_request_duration_seconds_count", route="/runway/tasks/{id}", method="GET") == 15
    assert value("gateway_auth_failures_total", reason="unknown_key") == 2
    assert value("gateway_quota_rejections_total", tenant="multi", limit="tasks_per_day") == 1
    assert value("gateway_tasks_created_total", tenant="multi", task_type="gen2") == 3
    assert value("gateway_credits_charged_total", tenant="multi") == 30
    assert value("gateway_upstream_requests_total", operation="create", status="200") == 3
    # Two callbacks per task (RUNNING, SUCCEEDED); a background poll may apply a state
    # first, and then its callback counts as duplicate or stale, never as lost.
    callbacks = {
        r: value("gateway_callbacks_received_total", result=r)
        for r in ("applied", "duplicate", "stale", "adopted", "unknown", "invalid", "bad_token")
    }
    assert callbacks["applied"] + callbacks["duplicate"] + callbacks["stale"] == 6, callbacks
    assert callbacks["adopted"] == callbacks["unknown"] == callbacks["invalid"] == callbacks["bad_token"] == 0, (
        callbacks
    )
    assert value("gateway_task_duration_seconds_count", task_type="gen2", status="SUCCEEDED") == 3
    assert value("gateway_tasks_active", tenant="multi") == 0
    assert value("gateway_build_info") == 1
    label_values = {v for _, lbl, _ in samples for v in lbl.values()}
    for secret in [*task_ids, tenant.key, prompt]:
        assert secret not in text
    assert not any(v.startswith("/runway/tasks/") and v != "/runway/tasks/{id}" for v in label_values)


def metric(g: GatewayProcess, name: str, **labels: str) -> float:
    return sum(
        v
        for n, lbl, v in parse(httpx.get(g.url + "/metrics").text)
        if n == name and all(lbl.get(k) == val for k, val in labels.items())
    )


def test_metrics_bearer_token(tmp_path: Path, sim: Simulator) -> None:
    g = GatewayProcess(
        tmp_path, sim.url, [TenantSpec("t")], extra_toml='[metrics]\nbearer_token = "scrape-secret-123"\n'
    )
    g.start()
    try:
        assert httpx.get(g.url + "/metrics").status_code == 401
        assert httpx.get(g.url + "/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = httpx.get(g.url + "/metrics", headers={"Authorization": "Bearer scrape-secret-123"})
        assert ok.status_code == 200 and "gateway_build_info" in ok.text
    finally:
        g.stop()


def test_healthz_and_readyz(gw: GatewayProcess) -> None:
    assert httpx.get(gw.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(gw.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["store"] == "ok" and ready.json()["upstream_circuit"] == "closed"


def test_a_refused_relay_key_is_logged_once_counted_and_reported_by_readyz(tmp_path: Path, own_sim: Simulator) -> None:
    """upstream.api_keys[1] is wrong: creates on it answer the tenant 502 (as before), and
    the operator gets one error line per interval, a counter by key index and /readyz's
    body, never the key itself. Readiness stays 200: the store answers."""
    wrong = "sk-wrong-relay-key-" + secrets.token_hex(8)
    g = GatewayProcess(tmp_path, own_sim.url, [TenantSpec("t")])
    g.config_path.write_text(
        g.config_path.read_text().replace(
            f'api_keys = ["{UPSTREAM_KEY}"]', f'api_keys = ["{UPSTREAM_KEY}", "{wrong}"]', 1
        )
    )
    g.start()
    try:
        ready = httpx.get(g.url + "/readyz").json()
        assert (ready["upstream_auth"], ready["upstream_auth_failing_keys"]) == ("ok", [])
        assert [metric(g, "gateway_upstream_auth_failures_total", key_index=i) for i in ("0", "1")] == [0, 0]
        assert (
            'gateway_upstream_auth_failures_total{key_index="1"} 0.0' in httpx.get(g.url + "/metrics").text
        )  # from the first scrape

        answers = [create(g, "t") for _ in range(6)]  # the keys take turns: 0, 1, 0, 1...
        assert [r.status_code for r in answers] == [200, 502] * 3
        for refused in answers[1::2]:
            assert refused.json()["error"]["code"] == "upstream_error" and wrong not in refused.text
        ready = httpx.get(g.url + "/readyz")
        assert ready.status_code == 200
        assert (ready.json()["upstream_auth"], ready.json()["upstream_auth_failing_keys"]) == ("failing", [1])
        assert metric(g, "gateway_upstream_auth_failures_total", key_index="1") == 3
        assert metric(g, "gateway_upstream_auth_failures_total", key_index="0") == 0

        # Now the relay refuses key 0 too (creates and the background status polls that
        # use it, whose success would clear it), then takes it again.
        own_sim.control(create_status=403, status_status=403)
        assert create(g, "t").status_code == 502
        assert httpx.get(g.url + "/readyz").json()["upstream_auth_failing_keys"] == [0, 1]
        own_sim.control(create_status=0, status_status=0)
        assert [create(g, "t").status_code for _ in range(2)] == [502, 200]
        assert httpx.get(g.url + "/readyz").json()["upstream_auth_failing_keys"] == [1]

        lines = wait_until(lambda: [e for e in g.access_log() if e.get("event") == "upstream_key_refused"], 5)
        assert [(e["level"], e["key_index"], e["upstream_status"]) for e in lines] == [
            ("error", 1, 401),
            ("error", 0, 403),
        ]
        assert wrong not in g.log_text() and wrong not in httpx.get(g.url + "/metrics").text
    finally:
        g.stop()


def create(g: GatewayProcess, tenant: str) -> httpx.Response:
    with g.client(tenant) as c:
        return c.post("/runway/tasks", json=gen2_body())


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own: it stops and restarts it."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def test_readyz_follows_the_redis_store(tmp_path: Path, sim: Simulator, own_redis: RedisServer) -> None:
    g = GatewayProcess(tmp_path, sim.url, [TenantSpec("t")], store_url=own_redis.url)
    g.start()
    try:
        assert httpx.get(g.url + "/readyz").status_code == 200
        own_redis.stop()
        down = httpx.get(g.url + "/readyz", timeout=10)
        assert down.status_code == 503 and down.json()["store"] == "unavailable"
        assert down.json()["error"]["code"] == "store_unavailable"
        with g.client("t") as c:
            r = c.get("/runway/tasks")
            assert r.status_code == 503
            assert r.json()["error"]["code"] == "store_unavailable"
            r = c.post("/runway/tasks", json=gen2_body())  # same keep-alive connection
            assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable"
        # Answered as a 503 (not an unhandled error that closes the connection), and logged so.
        wait_until(lambda: [e["status"] for e in g.access_log() if e.get("route") == "/runway/tasks"] == [503, 503], 5)
        assert "gateway_ready 0.0" in httpx.get(g.url + "/metrics", timeout=10).text
        own_redis.start()
        wait_until(lambda: httpx.get(g.url + "/readyz").status_code == 200, 15, message="ready again")
        with g.client("t") as c:
            assert c.get("/runway/tasks").status_code == 200
    finally:
        g.stop()


def test_sqlite_outage_is_503_and_a_broken_schema_is_500(tmp_path: Path, sim: Simulator) -> None:
    """Only an outage is 503 `store_unavailable`: while another process holds the SQLite
    write lock the store cannot take writes, so /readyz fails; a statement SQLite rejects
    (a table someone dropped) is a bug, answered 500, not disguised as an outage."""
    g = GatewayProcess(tmp_path, sim.url, [TenantSpec("t")])
    g.start()
    db = sqlite3.connect(str(g.config_path.with_suffix(".db")), isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        locked = httpx.get(g.url + "/readyz", timeout=10)
        assert locked.status_code == 503 and locked.json()["error"]["code"] == "store_unavailable"
        db.execute("COMMIT")
        assert httpx.get(g.url + "/readyz", timeout=10).status_code == 200
        db.execute("DROP TABLE idempotency")
        with g.client("t") as c:
            broken = c.post("/runway/tasks", json=gen2_body(), headers={"Idempotency-Key": "k1"})
        assert broken.status_code == 500 and broken.json()["error"]["code"] == "internal_error"
    finally:
        db.close()
        g.stop()
