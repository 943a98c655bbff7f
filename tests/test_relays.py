"""Several relays behind the one endpoint (contract §14), with real processes: two or three
simulators, each one relay, and a real gateway in front of them.

One test per row of §14's table, each asserting what every simulator received; then the
circuit (a relay answering 503 loses its traffic and gets it back after its cooldown),
weights, a task that stays with its relay across replicas, the ledger per relay, drain and
the reload that would orphan tasks, and GET /admin/v1/relays.
"""

from __future__ import annotations

import http.server
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import (
    ADMIN_KEY,
    UPSTREAM_KEY,
    GatewayProcess,
    RedisServer,
    Simulator,
    TenantSpec,
    free_port,
    gen2_body,
    wait_until,
)

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Simulator]]:
    """Relays `a`, `b` and `c`: one simulator each, reset before every test."""
    tmp = tmp_path_factory.mktemp("relay-sims")
    started = {name: Simulator(tmp) for name in ("a", "b", "c")}
    for s in started.values():
        s.start()
    yield started
    for s in started.values():
        s.stop()


@pytest.fixture
def relays(sims: dict[str, Simulator]) -> dict[str, Simulator]:
    for s in sims.values():
        s.reset()
    return sims


def relay_block(relay_id: str, url: str, **settings: Any) -> str:
    values: dict[str, Any] = {"api_keys": [UPSTREAM_KEY], "timeout_seconds": 3, "poll_interval_seconds": 1}
    values |= {"artifact_hosts": ["127.0.0.1"], **settings}
    lines = ["[[relays]]", f'id = "{relay_id}"', f'base_url = "{url}"']
    for key, value in values.items():
        lines.append(f"{key} = {_toml(value)}")
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


def write_relays(g: GatewayProcess, blocks: list[str], routing: str = "") -> None:
    """Replace the [upstream] table of `g`'s config with `blocks` and a [routing] table."""
    text = g.config_path.read_text()
    start = text.index("[upstream]") if "[upstream]" in text else text.index("[[relays]]")
    end = text.index("[store]")
    g.config_path.write_text(text[:start] + "\n".join(blocks) + f"\n[routing]\n{routing}\n\n" + text[end:])


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    """Start a gateway whose config has `blocks` as its [[relays]]; stopped at the end."""
    started: list[GatewayProcess] = []

    def start(
        blocks: list[str],
        tenants: list[TenantSpec] | None = None,
        routing: str = "cooldown_seconds = 2",
        **kw: Any,
    ) -> GatewayProcess:
        g = GatewayProcess(tmp_path, "http://unused.invalid", tenants or [TenantSpec("t")], **kw)
        write_relays(g, blocks, routing)
        g.start()
        started.append(g)
        return g

    yield start
    for g in started:
        g.stop()


def create(g: GatewayProcess, tenant: str = "t", **headers: str) -> httpx.Response:
    with g.client(tenant) as c:
        return c.post("/runway/tasks", json=gen2_body(), headers=headers)


def creates(s: Simulator) -> list[dict[str, Any]]:
    return list(s.requests()["creates"])


def created(s: Simulator) -> int:
    """Creates the relay accepted (it made a task for them)."""
    return sum(1 for c in creates(s) if c["task_id"])


def relays_view(g: GatewayProcess) -> dict[str, dict[str, Any]]:
    resp = httpx.get(g.url + "/admin/v1/relays", headers=ADMIN, timeout=5)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "list"
    return {r["id"]: r for r in body["data"]}


def metric(g: GatewayProcess, name: str, **labels: str) -> float:
    text = httpx.get(g.url + "/metrics", timeout=5).text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + "{"):
            series, _, value = line.rpartition(" ")
            got = ",".join(sorted(series[len(name) + 1 : -1].split(",")))
            if got == want:
                return float(value)
    raise AssertionError(f"{name}{{{want}}} not exported")


def create_line(g: GatewayProcess, request_id: str) -> dict[str, Any]:
    return wait_until(
        lambda: next((e for e in g.access_log() if e.get("request_id") == request_id), None), 5, 0.05, "the line"
    )


def two(relays: dict[str, Simulator], **a: Any) -> list[str]:
    """`a` first (priority 0), `b` behind it (priority 1)."""
    return [relay_block("a", relays["a"].url, priority=0, **a), relay_block("b", relays["b"].url, priority=1)]


# --- one test per row of the table ------------------------------------------------------


def test_not_sent_moves_to_the_next_relay(relays: dict[str, Simulator], gateway: Callable[..., GatewayProcess]) -> None:
    """Connection refused at `a` (nothing listens): `b` creates it; one charge."""
    dead = f"http://127.0.0.1:{free_port()}"
    g = gateway([relay_block("a", dead, priority=0), relay_block("b", relays["b"].url, priority=1)])
    resp = create(g, **{"x-request-id": "req-not-sent"})
    assert resp.status_code == 200, resp.text
    assert created(relays["b"]) == 1
    line = create_line(g, "req-not-sent")
    assert (line["relay"], line["relay_attempts"]) == ("b", 2)
    assert g.usage("t")["tasks_today"] == 1
    wait_until(lambda: metric(g, "gateway_relay_failovers_total", relay="a", reason="not_sent") == 1, 5)
    assert relays_view(g)["a"]["last_error"]


def test_429_moves_on_and_cools_the_relay_for_its_retry_after(
    relays: dict[str, Simulator], gateway: Callable[..., GatewayProcess]
) -> None:
    relays["a"].control(create_status=429, retry_after=30)
    g = gateway(two(relays))
    assert create(g).status_code == 200
    assert (len(creates(relays["a"])), created(relays["b"])) == (1, 1)
    view = relays_view(g)["a"]
    assert view["state"] == "cooling" and time.time() + 25 < view["until"] <= time.time() + 31
    for _ in range(3):  # cooling: skipped, not asked again
        assert create(g).status_code == 200
    assert (len(creates(relays["a"])), created(relays["b"])) == (1, 4)
    wait_until(lambda: metric(g, "gateway_relay_failovers_total", relay="a", reason="rate_limited") == 1, 5)
    wait_until(lambda: metric(g, "gateway_relay_up", relay="a") == 0, 5)


@pytest.mark.parametrize("status", [500, 503])
def test_5xx_moves_to_the_next_relay(
    relays: dict[str, Simulator], gateway: Callable[..., GatewayProcess], status: int
) -> None:
    relays["a"].control(create_status=status)
    g = gateway(two(relays))
    assert create(g).status_code == 200
    assert (len(creates(relays["a"])), created(relays["b"])) == (1, 1)
    wait_until(lambda: metric(g, "gateway_relay_failovers_total", relay="a", reason="error") == 1, 5)


def test_a_refused_key_tries_the_relays_other_keys_first(
    relays: dict[str, Simulator], gateway: Callable[..., GatewayProcess]
) -> None:
    """`a` refuses its first key (401): its second key creates the task; `b` sees nothing."""
    g = gateway(two(relays, api_keys=["sk-refused-by-a", UPSTREAM_KEY]))
    assert [create(g).status_code for _ in range(3)] == [200, 200, 200]
    keys = [c["headers"]["authorization"] for c in creates(relays["a"])]
    assert keys.count("Bearer sk-refused-by-a") == 1  # refused once, then tried last
    assert created(relays["a"]) == 3 and creates(relays["b"]) == []
    assert relays_view(g)["a"]["keys"] == {"total": 2, "refused": 1}


def test_every_key_refused_moves_to_the_next_relay(
    relays: dict[str, Simulator], gateway: Callable[..., GatewayProcess]
) -> None:
    g = gateway(two(relays, api_keys=["sk-wrong-1", "sk-wrong-2"]))
    assert create(g).status_code == 200
    assert sorted(c["headers"]["authorization"] for c in creates(relays["a"])) == [
        "Bearer sk-wrong-1",
        "Bearer sk-wrong-2",
    ]
    assert created(relays["b"]) == 1
    wait_until(lambda: metric(g, "gateway_relay_failovers_total", relay="a", reason="key_refused") == 1, 5)
    assert "sk-wrong" not in httpx.get(g.url + "/admin/v1/relays", headers=ADMIN).text


def test_another_4xx_is_the_tenants_answer_and_no_failover(
    relays: dict[str, Simulator], gateway: Callable[..., GatewayProcess]
) -> None:
    relays["a"].control(create_status=400)
    g = gateway(two(relays))
    resp = create(g)
    assert resp.status_code == 502 and resp.json()["error"]["code"] == "upstream_error", resp.text
    assert (len(creates(relays["a"])), creates(relays["b"])) == (1, [])
    assert g.usage("t")["tasks_today"] == 0  # refunded
    assert relays_view(g)["a"]["state"] == "closed"  # it judged the request: healthy


def test_a_timeout_never_goes_to_another_relay(
    relays: dict[str, Simulator], gateway: Callable[..., GatewayProcess]
) -> None:
    """Sent, then no answer in time: `b` gets nothing, and a retry with the same
    Idempotency-Key is 409 (outcome unknown), `b` still nothing."""
    relays["a"].control(hang_after_create=True, drop_callbacks=True)
    g = gateway([relay_block("a", relays["a"].url, priority=0, timeout_seconds=1), two(relays)[1]])
    first = create(g, **{"Idempotency-Key": "only-once", "x-request-id": "req-timeout"})
    assert first.status_code == 504 and first.json()["error"]["code"] == "upstream_timeout", first.text
    again = create(g, **{"Idempotency-Key": "only-once"})
    assert again.status_code == 409 and again.json()["error"]["code"] == "idempotency_outcome_unknown"
    assert len(creates(relays["a"])) == 1 and creates(relays["b"]) == []
    line = create_line(g, "req-timeout")
    assert (line["relay"], line["relay_attempts"]) == ("a", 1)
    assert g.usage("t")["tasks_today"] == 1  # the charge stands until settled (§6)


def test_an_unreadable_answer_never_goes_to_another_relay(
    relays: dict[str, Simulator], gateway: Callable[..., GatewayProcess]
) -> None:
    relays["a"].control(garbage=True)
    g = gateway(two(relays))
    resp = create(g)
    assert resp.status_code == 502, resp.text
    assert len(creates(relays["a"])) == 1 and creates(relays["b"]) == []


@contextmanager
def serving(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """A threaded HTTP server on 127.0.0.1 answering with `handler`: its URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def dropping_after_request() -> Iterator[tuple[str, list[str]]]:
    """A relay that reads each request whole, then closes the connection without a byte of
    answer (a relay crashing mid-create, a proxy cutting it): its URL and the request
    lines it read."""
    seen: list[str] = []

    class Drop(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            seen.append(self.requestline)
            self.close_connection = True  # no answer at all

        def log_message(self, *args: Any) -> None:
            pass

    with serving(Drop) as url:
        yield url, seen


def test_a_connection_dropped_after_the_create_never_goes_to_another_relay(
    relays: dict[str, Simulator], gateway: Callable[..., GatewayProcess]
) -> None:
    """The relay read the create and closed the connection without answering: it may have
    created the task, so the tenant gets 502, the charge stands until settled, and `b`
    never sees the create (§14)."""
    with dropping_after_request() as (url, seen):
        g = gateway([relay_block("a", url, priority=0), relay_block("b", relays["b"].url, priority=1)])
        resp = create(g, **{"x-request-id": "req-dropped"})
        assert seen == ["POST /runway/tasks HTTP/1.1"]
    assert resp.status_code == 502 and resp.json()["error"]["code"] == "upstream_error", resp.text
    assert creates(relays["b"]) == []
    line = create_line(g, "req-dropped")
    assert (line["relay"], line["relay_attempts"]) == ("a", 1)
    assert g.usage("t")["tasks_today"] == 1  # unknown outcome: charged until a callback or poll settles it


@contextmanager
def redirecting_to(target: str) -> Iterator[tuple[str, list[str]]]:
    """A relay that answers every request 307 to `target` (plus its path): its URL and the
    paths it received."""
    seen: list[str] = []

    class Redirect(http.server.BaseHTTPRequestHandler):
        def _redirect(self) -> None:
            seen.append(self.path)
            length = int(self.headers.get("content-length") or 0)
            self.rfile.read(length)
            self.send_response(307)
            self.send_header("location", target + self.path)
            self.send_header("content-length", "0")
            self.end_headers()

        do_POST = do_GET = _redirect

        def log_message(self, *args: Any) -> None:
            pass

    with serving(Redirect) as url:
        yield url, seen


def test_a_redirect_is_not_followed_to_another_host(
    relays: dict[str, Simulator], gateway: Callable[..., GatewayProcess]
) -> None:
    """A relay answering a create with a redirect to another host (here the relay `c`, not
    configured): the gateway does not send the create there (contract §13: no URL from the
    upstream is fetched outside the SSRF rules; §14: a create goes to a second place only
    when the first certainly created nothing); no answer with a task is unreadable."""
    with redirecting_to(relays["c"].url) as (url, seen):
        g = gateway([relay_block("a", url, priority=0), relay_block("b", relays["b"].url, priority=1)])
        resp = create(g)
        assert seen == ["/runway/tasks"]
    assert resp.status_code == 502, resp.text
    assert creates(relays["c"]) == [] and creates(relays["b"]) == []


def test_a_2xx_is_the_task_at_the_first_relay(
    relays: dict[str, Simulator], gateway: Callable[..., GatewayProcess]
) -> None:
    g = gateway(two(relays))
    resp = create(g, **{"x-request-id": "req-ok"})
    assert resp.status_code == 200
    assert (created(relays["a"]), creates(relays["b"])) == (1, [])
    assert (create_line(g, "req-ok")["relay"], create_line(g, "req-ok")["relay_attempts"]) == ("a", 1)


def test_every_relay_refusing_is_503_with_retry_after_and_refunded(
    relays: dict[str, Simulator], gateway: Callable[..., GatewayProcess]
) -> None:
    relays["a"].control(create_status=503)
    relays["b"].control(create_status=429, retry_after=7)
    g = gateway(two(relays))
    resp = create(g)
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "upstream_unavailable", resp.text
    assert 1 <= int(resp.headers["retry-after"]) <= 7
    assert (len(creates(relays["a"])), len(creates(relays["b"]))) == (1, 1)
    assert g.usage("t") == {
        "active": 0,
        "tasks_today": 0,
        "credits_today": 0,
        "credits_this_month": 0,
        "tasks_this_month": 0,
    }
    ledger = httpx.get(g.url + "/admin/v1/usage?group_by=relay", headers=ADMIN).json()["data"]
    assert ledger == []  # no trace


# --- the circuit, weights, policy -------------------------------------------------------


def test_a_failing_relay_opens_and_gets_traffic_back_after_its_cooldown(
    relays: dict[str, Simulator], gateway: Callable[..., GatewayProcess]
) -> None:
    relays["a"].control(create_status=503)
    g = gateway(two(relays), routing="cooldown_seconds = 2")
    assert [create(g).status_code for _ in range(10)] == [200] * 10
    assert len(creates(relays["a"])) <= 6 and created(relays["b"]) == 10
    assert relays_view(g)["a"]["state"] in ("open", "half_open")
    relays["a"].control(create_status=0)
    recovered = time.monotonic()

    def back() -> bool:
        return create(g).status_code == 200 and created(relays["a"]) > 0

    wait_until(back, 4, 0.1, "traffic back at a")
    assert time.monotonic() - recovered <= 2 + 2
    assert relays_view(g)["a"]["state"] == "closed"
    # the ledger books each task under the relay that created it: the failed-over ones at b
    rows = httpx.get(g.url + "/admin/v1/usage?group_by=relay", headers=ADMIN).json()["data"]
    assert {r["relay"]: r["tasks_created"] for r in rows} == {"a": created(relays["a"]), "b": created(relays["b"])}


@contextmanager
def held_relay() -> Iterator[tuple[str, list[str], dict[str, threading.Event]]]:
    """A relay that answers each create by the marker in its prompt: `hold-503` and
    `hold-ok` wait for their event (a slow create) then answer 503 or a task; any other
    at once 503. Its URL, the markers it received in order, and the two events."""
    seen: list[str] = []
    release = {"hold-503": threading.Event(), "hold-ok": threading.Event()}

    class Held(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0)).decode()
            marker = next((m for m in ("hold-503", "hold-ok", "fast") if m in body), "other")
            seen.append(marker)
            if marker in release:
                release[marker].wait(30)
            if marker == "hold-ok":
                self._answer(200, b'{"task": {"id": "held-task-1", "status": "PENDING"}}')
            else:
                self._answer(503, b'{"error": "busy"}')

        def do_GET(self) -> None:
            self._answer(200, b'{"task": {"id": "held-task-1", "status": "RUNNING"}}')

        def _answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    with serving(Held) as url:
        try:
            yield url, seen, release
        finally:
            for event in release.values():
                event.set()


def test_a_late_failure_from_before_the_circuit_opened_never_lets_a_second_probe_through(
    relays: dict[str, Simulator], gateway: Callable[..., GatewayProcess]
) -> None:
    """A slow create sent to `a` while its circuit was closed fails only after the circuit
    opened and its half-open probe went out. That old failure says nothing about `a` now:
    the probe stays the only create at `a` (before, it re-opened the circuit, and once the
    cooldown passed a second probe went out while the first still ran)."""
    with held_relay() as (url, seen, release):
        blocks = [relay_block("a", url, priority=0, timeout_seconds=20), relay_block("b", relays["b"].url, priority=1)]
        g = gateway(blocks, routing="cooldown_seconds = 1")
        with g.client("t") as c, ThreadPoolExecutor(2) as pool:

            def send(marker: str) -> httpx.Response:
                return c.post("/runway/tasks", json=gen2_body(f"{marker} prompt"), timeout=30)

            slow = pool.submit(send, "hold-503")
            wait_until(lambda: seen == ["hold-503"], 5, 0.01, "the slow create at a")
            # five creates answered 503 at once open a's circuit; each fails over to b
            assert [send("fast").status_code for _ in range(5)] == [200] * 5
            assert relays_view(g)["a"]["state"] == "open"
            wait_until(lambda: relays_view(g)["a"]["state"] == "half_open", 5, 0.05, "half-open")
            probe = pool.submit(send, "hold-ok")
            wait_until(lambda: seen[-1:] == ["hold-ok"], 5, 0.01, "the probe at a")
            release["hold-503"].set()
            assert slow.result(timeout=30).status_code == 200  # failed over to b: 503 created nothing
            time.sleep(1.3)  # past a cooldown the late failure would have started
            assert send("fast").status_code == 200
            assert seen == ["hold-503", *["fast"] * 5, "hold-ok"]  # the probe is still the only one
            assert relays_view(g)["a"]["state"] == "half_open"
            release["hold-ok"].set()
            assert probe.result(timeout=30).status_code == 200
    assert relays_view(g)["a"]["state"] == "closed"


def test_weights_spread_new_tasks(relays: dict[str, Simulator], gateway: Callable[..., GatewayProcess]) -> None:
    g = gateway([relay_block("a", relays["a"].url, weight=3), relay_block("b", relays["b"].url, weight=1)])
    with g.client("t") as c:
        for _ in range(200):
            assert c.post("/runway/tasks", json=gen2_body()).status_code == 200
    at_a, at_b = created(relays["a"]), created(relays["b"])
    assert at_a + at_b == 200 and 0.65 <= at_a / 200 <= 0.85, (at_a, at_b)
    # the ledger books each task under the relay that created it
    rows = httpx.get(g.url + "/admin/v1/usage?group_by=relay", headers=ADMIN).json()["data"]
    assert {r["relay"]: r["tasks_created"] for r in rows} == {"a": at_a, "b": at_b}
    csv = httpx.get(g.url + "/admin/v1/usage?group_by=tenant,relay&format=csv", headers=ADMIN).text
    assert csv.splitlines()[0].startswith("tenant,relay,") and f"t,a,{at_a}," in csv


def test_a_tenants_policy_keeps_it_on_its_relays(
    relays: dict[str, Simulator], gateway: Callable[..., GatewayProcess]
) -> None:
    """`policy.relays = ["b"]`: never `a`, even when `b` fails."""
    relays["b"].control(create_status=503)
    tenants = [TenantSpec("only-b", extra='relays = ["b"]'), TenantSpec("t")]
    g = gateway(two(relays), tenants=tenants)
    resp = create(g, "only-b")
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "upstream_unavailable", resp.text
    assert int(resp.headers["retry-after"]) >= 1 and creates(relays["a"]) == []
    assert len(creates(relays["b"])) == 1
    assert create(g, "t").status_code == 200 and created(relays["a"]) == 1


# --- a task belongs to its relay ---------------------------------------------------------


def test_a_task_is_polled_at_its_own_relay_by_another_replica(
    relays: dict[str, Simulator], tmp_path: Path, gateway: Callable[..., GatewayProcess]
) -> None:
    """Replica 1 sends new tasks to `b` (`a` drained there); replica 2 prefers `a`. A task
    replica 1 created at `b` is finished by replica 2 polling `b`, never `a`."""
    for s in relays.values():
        s.control(drop_callbacks=True, seconds_to_finish=1.5)
    server = RedisServer(tmp_path)
    server.start()
    try:
        url = f"redis://127.0.0.1:{server.port}/0?prefix=relays"
        tenants = [TenantSpec("t")]
        one = gateway([*two(relays, enabled=False)], tenants=tenants, store_url=url, callbacks=False)
        resp = create(one)
        assert resp.status_code == 200 and created(relays["b"]) == 1
        task_id = resp.json()["task"]["id"]
        one.stop()  # replica 1 polls no more
        other = gateway(two(relays), tenants=tenants, store_url=url, callbacks=False)
        with other.client("t") as c:
            done = wait_until(
                lambda: (r := c.get(f"/runway/tasks/{task_id}").json()["task"])["status"] == "SUCCEEDED" and r,
                15,
                0.2,
            )
        assert done["id"] == task_id
        assert relays["b"].requests()["status_calls_by_id"].get(task_id, 0) >= 1
        assert relays["a"].requests()["status_calls"] == 0 and creates(relays["a"]) == []
    finally:
        server.stop()


def test_a_drained_relay_takes_no_new_task_and_keeps_serving_its_own(
    relays: dict[str, Simulator], gateway: Callable[..., GatewayProcess]
) -> None:
    for s in relays.values():
        s.control(drop_callbacks=True, seconds_to_finish=3)
    g = gateway(two(relays), callbacks=False)
    first = create(g).json()["task"]["id"]
    assert created(relays["a"]) == 1
    write_relays(g, two(relays, enabled=False), "cooldown_seconds = 2")
    os.kill(g.proc.pid, signal.SIGHUP)  # type: ignore[union-attr]
    wait_until(lambda: "config reloaded" in g.log_text(), 10)
    assert create(g).status_code == 200 and created(relays["b"]) == 1 and created(relays["a"]) == 1
    assert relays_view(g)["a"]["enabled"] is False
    with g.client("t") as c:
        wait_until(lambda: c.get(f"/runway/tasks/{first}").json()["task"]["status"] == "SUCCEEDED", 15, 0.2)
    assert relays["a"].requests()["status_calls_by_id"].get(first, 0) >= 1


def test_a_reload_removing_a_relay_with_active_tasks_is_refused(
    relays: dict[str, Simulator], gateway: Callable[..., GatewayProcess]
) -> None:
    relays["a"].control(drop_callbacks=True, seconds_to_finish=600)
    g = gateway(two(relays), callbacks=False)
    assert create(g).status_code == 200 and created(relays["a"]) == 1
    write_relays(g, [relay_block("b", relays["b"].url)], "cooldown_seconds = 2")
    os.kill(g.proc.pid, signal.SIGHUP)  # type: ignore[union-attr]
    line = wait_until(lambda: [x for x in g.log_text().splitlines() if "config reload refused" in x], 10)
    assert "'a'" in line[0] and "1 active task" in line[0], line
    assert set(relays_view(g)) == {"a", "b"}  # the old config stands, whole


def test_the_relays_view(relays: dict[str, Simulator], gateway: Callable[..., GatewayProcess]) -> None:
    g = gateway(two(relays))
    assert httpx.get(g.url + "/admin/v1/relays", headers={"Authorization": "Bearer nope"}).status_code == 401
    view = relays_view(g)
    assert view["a"] == {
        "object": "relay",
        "id": "a",
        "host": "127.0.0.1",
        "priority": 0,
        "weight": 1,
        "enabled": True,
        "state": "closed",
        "until": None,
        "keys": {"total": 1, "refused": 0},
        "last_error": None,
        "failovers": 0,
    }
    assert UPSTREAM_KEY not in httpx.get(g.url + "/admin/v1/relays", headers=ADMIN).text
    for relay in ("a", "b"):  # every series from the first scrape
        assert metric(g, "gateway_relay_up", relay=relay) == 1
        for reason in ("not_sent", "rate_limited", "error", "key_refused"):
            assert metric(g, "gateway_relay_failovers_total", relay=relay, reason=reason) == 0
        assert metric(g, "gateway_upstream_requests_total", relay=relay, operation="create", status="200") == 0


# --- issue 25, item 1: artifact hosts are not the relay ----------------------------------


def test_a_broken_artifact_host_never_stops_creates(tmp_path: Path, start_gateway: Callable[..., Any]) -> None:
    """Six downloads whose artifact host refuses connections leave the relay's circuit
    closed: creates and status reads still reach the healthy relay (before the fix, the
    fifth failed download opened it and every create was 503 upstream_unavailable)."""
    sim = Simulator(tmp_path, seconds_to_finish=0.3)
    sim.env["SIMULATOR_PUBLIC_URL"] = f"http://127.0.0.1:{free_port()}"  # artifact URLs point nowhere
    sim.start()
    try:
        g = start_gateway(sim.url, [TenantSpec("t")])
        with g.client("t") as c:
            video = c.post("/v1/videos", json={"prompt": "artifact host down"}).json()
            wait_until(lambda: c.get(f"/v1/videos/{video['id']}").json()["status"] == "completed", 15, 0.1)
            for _ in range(6):
                resp = c.get(f"/v1/videos/{video['id']}/content")
                assert resp.status_code == 503 and resp.json()["error"]["code"] == "upstream_unavailable"
            assert httpx.get(g.url + "/readyz").json()["upstream_circuit"] == "closed"
            assert c.post("/runway/tasks", json=gen2_body()).status_code == 200
    finally:
        sim.stop()


def test_a_task_is_served_while_its_relays_circuit_is_open(
    relays: dict[str, Simulator], gateway: Callable[..., GatewayProcess]
) -> None:
    """The circuit is the creates': `a` failing creates opens it, yet the task `a` created
    before is still polled there and finishes; the polls take no probe and close nothing."""
    relays["a"].control(drop_callbacks=True, seconds_to_finish=2)
    g = gateway(two(relays), routing="cooldown_seconds = 60", callbacks=False)
    task_id = create(g).json()["task"]["id"]
    relays["a"].control(create_status=503)
    assert [create(g).status_code for _ in range(6)] == [200] * 6  # b takes them
    assert relays_view(g)["a"]["state"] == "open" and len(creates(relays["a"])) == 6  # 1 + 5 failures
    with g.client("t") as c:
        wait_until(lambda: c.get(f"/runway/tasks/{task_id}").json()["task"]["status"] == "SUCCEEDED", 15, 0.2)
    assert relays["a"].requests()["status_calls_by_id"].get(task_id, 0) >= 1
    assert relays_view(g)["a"]["state"] == "open"  # the polls' answers closed nothing


def test_a_reload_adds_a_relay_without_a_restart(
    relays: dict[str, Simulator], start_gateway: Callable[..., GatewayProcess]
) -> None:
    """From the old [upstream] (relay `default`) to [[relays]] keeping `default` and adding
    `c` before it: new tasks go to `c` at once; the task `default` created stays there."""
    relays["a"].control(drop_callbacks=True, seconds_to_finish=2)
    g = start_gateway(relays["a"].url, [TenantSpec("t")], callbacks=False)
    assert "[upstream]" in g.config_path.read_text()
    first = create(g).json()["task"]["id"]
    write_relays(g, [relay_block("default", relays["a"].url, priority=1), relay_block("c", relays["c"].url)])
    os.kill(g.proc.pid, signal.SIGHUP)  # type: ignore[union-attr]
    wait_until(lambda: "config reloaded" in g.log_text(), 10)
    assert create(g, **{"x-request-id": "req-new-relay"}).status_code == 200
    assert (created(relays["c"]), created(relays["a"])) == (1, 1)
    assert create_line(g, "req-new-relay")["relay"] == "c"
    with g.client("t") as c:
        wait_until(lambda: c.get(f"/runway/tasks/{first}").json()["task"]["status"] == "SUCCEEDED", 15, 0.2)
    assert first in relays["a"].requests()["status_calls_by_id"]
    assert first not in relays["c"].requests()["status_calls_by_id"]
