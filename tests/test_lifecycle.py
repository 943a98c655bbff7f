"""Task lifecycle with real processes: callbacks, polling, signed webhooks, crashes and
timeouts. Idempotent creates are in test_idempotency.py."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from conftest import GatewayProcess, Simulator, TenantSpec, free_port, gen2_body, wait_until

from gateway.webhooks import verify


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes
    answered: int


@dataclass
class Receiver:
    """A tenant's webhook endpoint: records every delivery; fails while told to."""

    port: int = field(default_factory=free_port)
    fail_next: int = 0
    failing: bool = False
    deliveries: list[Delivery] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def ok(self) -> list[Delivery]:
        with self.lock:
            return [d for d in self.deliveries if d.answered == 200]

    def statuses(self) -> list[str]:
        return [json.loads(d.body)["task"]["status"] for d in self.ok()]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            with rec.lock:
                fail = rec.failing or rec.fail_next > 0
                rec.fail_next = max(0, rec.fail_next - 1)
                code = 500 if fail else 200
                rec.deliveries.append(Delivery({k.lower(): v for k, v in self.headers.items()}, body, code))
            self.send_response(code)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", rec.port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield rec
    server.shutdown()
    server.server_close()


def create(
    g: GatewayProcess, tenant: str, hook: str | None = None, prompt: str = "lifecycle", **kw: Any
) -> httpx.Response:
    body = gen2_body(prompt)
    if hook:
        body["notify_hook"] = hook
    with g.client(tenant) as c:
        return c.post("/runway/tasks", json=body, **kw)


def status_of(g: GatewayProcess, tenant: str, task_id: str) -> str:
    with g.client(tenant) as c:
        return c.get(f"/runway/tasks/{task_id}").json()["task"]["status"]


# --- webhooks --------------------------------------------------------------------------


def test_webhooks_running_then_succeeded_signed(gw: GatewayProcess, receiver: Receiver) -> None:
    tenant = gw.tenants["team-a"]
    task_id = create(gw, "team-a", receiver.url).json()["task"]["id"]
    wait_until(lambda: len(receiver.ok()) >= 2, 15, message="two webhooks")
    ok = receiver.ok()
    assert receiver.statuses() == ["RUNNING", "SUCCEEDED"]
    ids = [d.headers["x-gateway-event-id"] for d in ok]
    assert len(set(ids)) == 2
    for d in ok:
        assert json.loads(d.body)["task"]["id"] == task_id
        assert verify(tenant.webhook_secret, d.body, d.headers["x-gateway-signature"])
        assert not verify("another-secret", d.body, d.headers["x-gateway-signature"])
        assert d.headers["x-gateway-delivery-attempt"] == "1"
        assert d.headers["content-type"] == "application/json"


def test_webhook_signature_is_hmac_sha256_of_timestamp_dot_body(gw: GatewayProcess, receiver: Receiver) -> None:
    """Receivers check signatures with code of their own, so the header must be exactly
    `t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`: computed here, not by gateway.webhooks."""
    secret = gw.tenants["team-a"].webhook_secret
    create(gw, "team-a", receiver.url, "signed exactly")
    delivery = wait_until(receiver.ok, 15, message="a webhook")[0]
    header = delivery.headers["x-gateway-signature"]
    match = re.fullmatch(r"t=([0-9]+),v1=([0-9a-f]{64})", header)
    assert match, header
    timestamp, mac = match.groups()
    assert abs(int(timestamp) - time.time()) < 60
    assert mac == hmac.new(secret.encode(), timestamp.encode() + b"." + delivery.body, hashlib.sha256).hexdigest()


def test_webhook_retried_until_receiver_recovers(gw: GatewayProcess, receiver: Receiver) -> None:
    receiver.fail_next = 3
    create(gw, "team-a", receiver.url)
    wait_until(lambda: len(receiver.ok()) >= 2, 20, message="deliveries after failures")
    first = receiver.deliveries[0].headers["x-gateway-event-id"]
    attempts = [d for d in receiver.deliveries if d.headers["x-gateway-event-id"] == first]
    assert [d.headers["x-gateway-delivery-attempt"] for d in attempts] == ["1", "2", "3", "4"]
    assert [d.answered for d in attempts] == [500, 500, 500, 200]
    assert receiver.statuses() == ["RUNNING", "SUCCEEDED"]  # in order, the second waited for the first


def test_webhook_survives_sigkill_between_attempts(tmp_path, sim: Simulator, receiver: Receiver) -> None:
    g = GatewayProcess(tmp_path, sim.url, [TenantSpec("t")])
    g.start()
    try:
        receiver.failing = True
        task_id = create(g, "t", receiver.url).json()["task"]["id"]
        wait_until(lambda: status_of(g, "t", task_id) == "SUCCEEDED", 15)
        wait_until(lambda: len(receiver.deliveries) >= 2, 10, message="failed attempts")
        g.kill(signal.SIGKILL)
        receiver.failing = False
        g.start()
        # the attempt in flight at the kill stays leased (20 s) before it is retried
        wait_until(lambda: len(receiver.ok()) >= 2, 35, message="delivery after restart")
        assert receiver.statuses() == ["RUNNING", "SUCCEEDED"]
        by_event: dict[str, set[str]] = {}
        for d in receiver.deliveries:
            by_event.setdefault(d.headers["x-gateway-event-id"], set()).add(json.loads(d.body)["task"]["status"])
        assert len(by_event) == 2 and all(len(s) == 1 for s in by_event.values())  # duplicates only with the same id
    finally:
        g.stop()


# --- callbacks: duplicates, reordering, refunds ----------------------------------------


def test_duplicate_and_reversed_callbacks_settle_once(own_sim: Simulator, start_gateway, receiver: Receiver) -> None:
    g = start_gateway(own_sim.url, [TenantSpec("t", limits={"credits_per_day": 1000})])
    own_sim.control(duplicate_callbacks=True, fail_rate=1.0)
    failed_id = create(g, "t", receiver.url).json()["task"]["id"]
    wait_until(lambda: status_of(g, "t", failed_id) == "FAILED", 15)
    wait_until(lambda: len(receiver.ok()) >= 2, 10)
    assert g.usage("t")["credits_today"] == 0  # charged 10, refunded once (not twice: never negative)
    own_sim.control(fail_rate=0.0)  # the second task must not fail (and be refunded) meanwhile
    create(g, "t")  # a second task proves the refund was exactly 10, not more
    assert g.usage("t")["credits_today"] == 10
    own_sim.control(duplicate_callbacks=False, fail_rate=0.0, reverse_callbacks=True)
    task_id = create(g, "t").json()["task"]["id"]
    wait_until(lambda: status_of(g, "t", task_id) == "SUCCEEDED", 15)
    wait_until(
        lambda: any(c["task_id"] == task_id and c["status"] == "RUNNING" for c in own_sim.requests()["callbacks"]), 10
    )
    assert status_of(g, "t", task_id) == "SUCCEEDED"  # the late RUNNING did not overwrite it
    assert receiver.statuses().count("FAILED") == 1


# --- polling when callbacks are off -----------------------------------------------------


def test_polling_reaches_succeeded_with_few_upstream_calls(sim: Simulator, start_gateway) -> None:
    g = start_gateway(sim.url, [TenantSpec("t")], callbacks=False)
    task_id = create(g, "t").json()["task"]["id"]
    assert "notify_hook" not in next(c for c in sim.requests()["creates"] if c["task_id"] == task_id)["body"]

    def poll_many(_: int) -> str:
        with g.client("t") as c:
            return c.get(f"/runway/tasks/{task_id}").json()["task"]["status"]

    with ThreadPoolExecutor(10) as pool:
        list(pool.map(poll_many, range(100)))
    wait_until(lambda: status_of(g, "t", task_id) == "SUCCEEDED", 15)
    calls = sim.requests()["status_calls_by_id"].get(task_id, 0)
    assert 1 <= calls <= 6, calls


# --- timeouts --------------------------------------------------------------------------


def test_timed_out_task_frees_its_slot_and_still_updates(own_sim: Simulator, start_gateway) -> None:
    own_sim.control(seconds_to_finish=8)
    g = start_gateway(
        own_sim.url, [TenantSpec("t", limits={"max_active_tasks": 1})], upstream_section="task_timeout_seconds = 1"
    )
    first = create(g, "t").json()["task"]["id"]
    assert create(g, "t").status_code == 429
    wait_until(lambda: create(g, "t").status_code == 200, 10, interval=0.5, message="slot freed by timeout")
    wait_until(lambda: status_of(g, "t", first) == "SUCCEEDED", 15)


# --- crash during a burst --------------------------------------------------------------


def test_sigkill_during_creates_loses_no_task(tmp_path, own_sim: Simulator) -> None:
    # A task created just before the kill is known only by its SUCCEEDED callback (the
    # simulator does not retry callbacks): it must come after the restart, with slack.
    own_sim.control(seconds_to_finish=8)
    port = free_port()
    g = GatewayProcess(tmp_path, own_sim.url, [TenantSpec("t")], port=port)
    g.start()
    try:

        def fire(i: int) -> int:
            try:
                with g.client("t", timeout=5) as c:
                    return c.post("/runway/tasks", json=gen2_body(f"burst {i}")).status_code
            except httpx.HTTPError:
                return 0

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(fire, i) for i in range(60)]
            wait_until(lambda: own_sim.requests()["creates_total"] >= 10, 10)
            g.kill(signal.SIGKILL)
            [f.result() for f in futures]
        g.start()
        created = [t["id"] for t in own_sim.tasks()]
        assert created

        def all_known() -> bool:
            with g.client("t") as c:
                return all(c.get(f"/runway/tasks/{i}").status_code == 200 for i in created)

        wait_until(all_known, 30, interval=0.3, message="every upstream task known to the gateway")
        wait_until(lambda: all(status_of(g, "t", i) == "SUCCEEDED" for i in created), 30, interval=0.3)
        with g.client("t") as c:
            listed = c.get("/runway/tasks", params={"limit": 100}).json()["data"]
        assert sorted(t["id"] for t in listed) == sorted(created)  # each once
        usage = g.usage("t")
        # every known task charged once; reservations never sent stay charged as unknown
        assert usage["credits_today"] >= 10 * len(created)
        assert usage["credits_today"] <= 10 * (len(created) + 8)
    finally:
        g.stop()


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_a_create_whose_gateway_was_killed_frees_its_slot_as_an_unknown_outcome(
    own_sim: Simulator, start_gateway, store: str, request: pytest.FixtureRequest
) -> None:
    """A gateway SIGKILLed while the relay holds its create's answer leaves the reservation
    SUBMITTING, charged and holding a `max_active_tasks` slot. Another replica on the same
    Redis (on SQLite: the gateway restarted) takes it for an unknown outcome once it has
    been in flight longer than the relay timeout (3 s) plus the 5 s margin, and frees the
    slot `unknown_outcome_timeout_seconds` (here 2 s) after admission at the earliest,
    not after `task_timeout_seconds` (an hour); the charge stands."""
    tenant = TenantSpec("t", limits={"max_active_tasks": 1})
    kw: dict[str, Any] = {"upstream_section": "unknown_outcome_timeout_seconds = 2"}
    if store == "redis":
        kw["store_url"] = request.getfixturevalue("redis_store_url")
    doomed_gw: GatewayProcess = start_gateway(own_sim.url, [tenant], **kw)
    other = start_gateway(own_sim.url, [tenant], **kw) if store == "redis" else doomed_gw
    own_sim.control(hang_after_create=True, drop_callbacks=True, seconds_to_finish=60)

    def doomed() -> None:
        with doomed_gw.client("t") as c, pytest.raises(httpx.TransportError):
            c.post("/runway/tasks", json=gen2_body("Lost with its gateway."))

    sent_at = time.time()
    first = threading.Thread(target=doomed)
    first.start()
    wait_until(lambda: own_sim.requests()["creates_total"] == 1, 10, message="the create upstream")
    admitted_by = time.time()
    doomed_gw.kill(signal.SIGKILL)
    first.join(10)
    own_sim.control(hang_after_create=False)
    if other is doomed_gw:
        doomed_gw.start()
    charged = other.usage("t")
    assert (charged["active"], charged["tasks_today"]) == (1, 1)
    with other.client("t") as c:
        refused = c.post("/runway/tasks", json=gen2_body())
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "concurrency_limit_exceeded"
        admitted: httpx.Response = wait_until(
            lambda: (r := c.post("/runway/tasks", json=gen2_body())).status_code != 429 and r,
            30,
            0.25,
            "the slot freed",
        )
    freed_by = time.time()
    assert admitted.status_code == 200, admitted.text
    assert freed_by - sent_at >= 3 + 5, "freed while a live gateway could still have been waiting"
    assert freed_by - admitted_by <= 3 + 5 + 5 + 5, "not freed by the next sweeps (every 5 s)"
    usage = other.usage("t")  # the lost create's charge stands
    assert (usage["active"], usage["tasks_today"], usage["credits_today"]) == (1, 2, 2 * charged["credits_today"])
    assert own_sim.requests()["creates_total"] == 2
    logs = other.access_log()
    [expired] = [line for line in logs if line.get("event") == "create_outcome_unknown_expired"]
    assert expired["level"] == "warning" and expired["tenant"] == "t" and expired["credits"] == charged["credits_today"]


@pytest.mark.parametrize("status_status", [404, 429, 503])
def test_failing_status_polls_lose_no_task(own_sim: Simulator, start_gateway, status_status: int) -> None:
    g = start_gateway(own_sim.url, [TenantSpec("t", limits={"max_active_tasks": 5})], callbacks=False)
    own_sim.control(status_status=status_status)  # before the create: no poll may succeed first
    task_id = create(g, "t").json()["task"]["id"]
    wait_until(lambda: own_sim.requests()["status_calls_by_id"].get(task_id, 0) >= 2, 10, message="failed polls")
    assert status_of(g, "t", task_id) == "PENDING"  # unchanged, still known, still active
    assert g.usage("t")["active"] == 1
    own_sim.control(status_status=0)
    wait_until(lambda: status_of(g, "t", task_id) == "SUCCEEDED", 15)
    assert g.usage("t")["active"] == 0
