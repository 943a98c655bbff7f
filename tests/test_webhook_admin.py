"""Dead webhook deliveries an operator sees and redelivers (contract §10), with real
processes: a gateway (SQLite, then the tests' private Redis), the simulated relay, and a
tenant hook on a local port that is closed until the test starts a receiver there."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ADMIN_KEY, GatewayProcess, Simulator, TenantSpec, free_port, gen2_body, wait_until

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
# Two attempts, 0.2 s apart (GatewayProcess's backoff): an event dies within a second.
# GatewayProcess writes `[webhooks]` last before `extra_toml`, so this line lands in it.
FAST_DEATH = "max_attempts = 2\n"


@dataclass
class Receiver:
    """A tenant's webhook endpoint on a given port: records every delivery, answers 200."""

    port: int
    deliveries: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def received(self) -> list[tuple[dict[str, str], bytes]]:
        with self.lock:
            return list(self.deliveries)


@pytest.fixture
def listen() -> Iterator[Callable[[int], Receiver]]:
    """Start a receiver on a port (the hook's, closed until then); stopped after the test."""
    servers: list[ThreadingHTTPServer] = []

    def start(port: int) -> Receiver:
        rec = Receiver(port)

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with rec.lock:
                    rec.deliveries.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return rec

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "redis":
        return str(request.getfixturevalue("redis_store_url"))
    return f"sqlite:///{tmp_path / 'gw.db'}"


def admin_get(gw: GatewayProcess, path: str, **params: str) -> httpx.Response:
    return httpx.get(f"{gw.url}/admin/v1{path}", params=params, headers=ADMIN, timeout=10)


def redeliver(gw: GatewayProcess, event_id: str) -> httpx.Response:
    return httpx.post(f"{gw.url}/admin/v1/webhooks/{event_id}/redeliver", headers=ADMIN, timeout=10)


def events(gw: GatewayProcess, **params: str) -> list[dict[str, Any]]:
    resp = admin_get(gw, "/webhooks", **params)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "list" and body["has_more"] is False
    return list(body["data"])


def test_a_dead_event_is_listed_and_redelivered_in_its_task_order(
    tmp_path: Path, store_url: str, listen: Callable[[int], Receiver]
) -> None:
    sim = Simulator(tmp_path, seconds_to_finish=0.5)
    sim.start()
    tenant = TenantSpec("hooked")
    gw = GatewayProcess(tmp_path, sim.url, [tenant], store_url=store_url, extra_toml=FAST_DEATH)
    gw.start()
    try:
        _run(gw, tenant, listen)
    finally:
        gw.stop()
        sim.stop()


def create(gw: GatewayProcess, tenant: TenantSpec, hook: str) -> str:
    """A task with a tenant hook, once the relay finished it: its upstream id."""
    with gw.client(tenant.id) as c:
        created = c.post("/runway/tasks", json={**gen2_body("dead hook"), "notify_hook": hook})
        assert created.status_code == 200, created.text
        task_id = str(created.json()["task"]["id"])
        wait_until(lambda: c.get(f"/runway/tasks/{task_id}").json()["task"]["status"] == "SUCCEEDED", 20)
    return task_id


def of_task(task_id: str, listed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in listed if e["task_id"] == task_id]


def _run(gw: GatewayProcess, tenant: TenantSpec, listen: Callable[[int], Receiver]) -> None:
    port = free_port()  # closed: every attempt is refused
    hook = f"http://127.0.0.1:{port}/h"
    task_id = create(gw, tenant, hook)
    # RUNNING dies after two refused attempts; SUCCEEDED waits behind it.
    [dead] = wait_until(lambda: of_task(task_id, events(gw, status="dead")), 20, message="a dead event")
    # Another task's event dying proves the dispatcher went round several times since.
    later_task = create(gw, tenant, hook)
    wait_until(lambda: of_task(later_task, events(gw, status="dead")), 20, message="the later task's dead event")

    assert dead["object"] == "webhook_event" and re.fullmatch(r"evt_[0-9a-f]{32}", dead["id"])
    assert (dead["tenant"], dead["task_id"], dead["status"], dead["attempts"]) == (tenant.id, task_id, "dead", 2)
    assert dead["next_attempt_at"] is None and dead["last_error"] == "ConnectError"
    assert abs(dead["created_at"] - time.time()) < 60
    [waiting] = of_task(task_id, events(gw, status="pending", tenant=tenant.id))
    assert (waiting["status"], waiting["attempts"], waiting["last_error"]) == ("pending", 0, None)  # never tried
    assert waiting["id"] > dead["id"] and isinstance(waiting["next_attempt_at"], int)
    assert of_task(task_id, events(gw)) == [waiting, dead]  # newest first
    assert events(gw, tenant="nobody") == []

    # Refusals change nothing.
    bad = admin_get(gw, "/webhooks", status="delivered")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "status"
    unknown = redeliver(gw, "evt_nobody")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "webhook_event_not_found"
    assert unknown.json()["error"]["param"] == "event_id"
    not_dead = redeliver(gw, waiting["id"])
    assert not_dead.status_code == 409 and not_dead.json()["error"]["code"] == "webhook_event_not_dead"
    assert not_dead.json()["error"]["param"] == "event_id"
    tenant_key = httpx.post(f"{gw.url}/admin/v1/webhooks/{dead['id']}/redeliver", headers=tenant.headers(), timeout=10)
    assert tenant_key.status_code == 403
    assert admin_get(gw, "/audit", action="webhook.redeliver").json()["data"] == []

    rx = listen(port)
    again = redeliver(gw, dead["id"])
    assert again.status_code == 202, again.text
    body = again.json()
    assert (body["id"], body["status"], body["attempts"], body["last_error"]) == (dead["id"], "pending", 0, None)

    got = wait_until(lambda: len(rx.received()) >= 2 and rx.received(), 20, message="both deliveries")
    assert [h["x-gateway-event-id"] for h, _ in got] == [dead["id"], waiting["id"]]  # the task's order
    assert [json.loads(b)["task"]["status"] for _, b in got] == ["RUNNING", "SUCCEEDED"]
    assert [h["x-gateway-delivery-attempt"] for h, _ in got] == ["1", "1"]  # attempts were reset
    for headers, raw in got:
        match = re.fullmatch(r"t=([0-9]+),v1=([0-9a-f]{64})", headers["x-gateway-signature"])
        assert match, headers["x-gateway-signature"]
        stamp, mac = match.groups()
        expected = hmac.new(tenant.webhook_secret.encode(), stamp.encode() + b"." + raw, hashlib.sha256)
        assert mac == expected.hexdigest() and json.loads(raw)["task"]["id"] == task_id
    wait_until(lambda: of_task(task_id, events(gw)) == [], 10, message="the task's events delivered")
    assert [e["status"] for e in of_task(later_task, events(gw))] == ["pending", "dead"]  # not redelivered

    [entry] = admin_get(gw, "/audit", action="webhook.redeliver").json()["data"]
    assert entry["target"] == {"tenant": tenant.id} and entry["changes"] == {"event_id": dead["id"]}
    assert entry["actor"]["type"] == "admin_key"
