"""Webhook signing and delivery: a fake outbox (just claim/finish: the real stores have their
own contract tests) and real HTTP(S) receivers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from conftest import self_signed

from gateway.config import Config, Policy, Tenant, WebhookConfig
from gateway.directory import Directory
from gateway.logs import JSONFormatter
from gateway.store.base import DirectorySnapshot, TenantRecord, WebhookEvent
from gateway.webhooks import USER_AGENT, WebhookDispatcher, sign, verify

SECRET = "whsec_test_0123456789"
BODY = b'{"task": {"id": "task-1", "status": "RUNNING"}}'


# --- signing --------------------------------------------------------------------------------
def test_sign_verify_round_trip() -> None:
    header = sign(SECRET, BODY, 1_700_000_000)
    assert header.startswith("t=1700000000,v1=") and len(header.split("v1=")[1]) == 64
    assert verify(SECRET, BODY, header, now=1_700_000_100)


@pytest.mark.parametrize(
    "secret,body,header,now",
    [
        (SECRET, BODY + b" ", sign(SECRET, BODY, 1000), 1000),  # body changed
        (SECRET, BODY, sign(SECRET, BODY, 1000).replace("t=1000", "t=1001"), 1000),  # timestamp changed
        ("other-secret", BODY, sign(SECRET, BODY, 1000), 1000),
        (SECRET, BODY, sign(SECRET, BODY, 1000), 1000 + 301),  # too old: a replay
        (SECRET, BODY, sign(SECRET, BODY, 1000), 1000 - 301),  # from the future
        (SECRET, BODY, "v1=" + "0" * 64, 1000),
        (SECRET, BODY, "t=abc,v1=00", 1000),
        (SECRET, BODY, "", 1000),
        (SECRET, BODY, "garbage", 1000),
    ],
)
def test_verify_refuses_tampering(secret: str, body: bytes, header: str, now: float) -> None:
    assert not verify(secret, body, header, now=now)


def test_verify_accepts_any_of_several_signatures() -> None:
    """Room for secret rotation: the header may carry one v1 per secret, in any order."""
    good = sign(SECRET, BODY, 1000).split(",")[1]
    assert verify(SECRET, BODY, f"v1={'f' * 64}, {good}, t=1000", now=1000)


# --- fakes and receivers -------------------------------------------------------------------
@dataclass
class Clock:
    now: float = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeOutbox:
    """claim_webhooks/finish_webhook with the store's semantics: due, unleased, unfinished."""

    events: dict[str, WebhookEvent] = field(default_factory=dict)
    due: dict[str, float] = field(default_factory=dict)
    leased_until: dict[str, float] = field(default_factory=dict)
    finished: list[dict] = field(default_factory=list)

    def add(self, event: WebhookEvent, at: float) -> None:
        self.events[event.event_id] = event
        self.due[event.event_id] = at

    async def claim_webhooks(self, now: float, limit: int, lease: float) -> list[WebhookEvent]:
        ids = [i for i, at in self.due.items() if at <= now and self.leased_until.get(i, 0) <= now][:limit]
        for i in ids:
            self.leased_until[i] = now + lease
        return [self.events[i] for i in ids]

    async def finish_webhook(
        self,
        event_id: str,
        *,
        delivered: bool,
        attempts: int,
        next_at: float | None,
        now: float,
        error: str | None = None,
    ) -> None:
        self.finished.append(
            {"event_id": event_id, "delivered": delivered, "attempts": attempts, "next_at": next_at, "error": error}
        )
        self.leased_until.pop(event_id, None)
        ev = self.events[event_id]
        self.events[event_id] = WebhookEvent(
            ev.event_id, ev.rid, ev.tenant_id, ev.seq, ev.url, ev.body, attempts, ev.created_at
        )
        if delivered or next_at is None:
            self.due.pop(event_id)
        else:
            self.due[event_id] = next_at


@dataclass
class Receiver:
    """A minimal HTTP/1.1 server that records requests and answers from a list of statuses."""

    statuses: list[int]
    requests: list[dict] = field(default_factory=list)
    port: int = 0
    server: asyncio.AbstractServer | None = None

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> Receiver:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=ssl_context)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            method, target, _ = head[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in head[1:] if line)}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            self.requests.append({"method": method, "target": target, "headers": headers, "body": body})
            status = self.statuses[min(len(self.requests), len(self.statuses)) - 1]
            writer.write(f"HTTP/1.1 {status} X\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok".encode())
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()


def tenant(hook_hosts: list[str], secret: str = SECRET, tid: str = "search-team") -> Tenant:
    return Tenant(id=tid, webhook_secret=secret, policy=Policy(hook_hosts=tuple(hook_hosts)))


def event(url: str, eid: str = "evt_1", tid: str = "search-team") -> WebhookEvent:
    return WebhookEvent(event_id=eid, rid="rid-1", tenant_id=tid, seq=1, url=url, body=BODY)


@pytest.fixture
async def receiver():
    holder: list[Receiver] = []

    async def make(statuses: list[int], ssl_context: ssl.SSLContext | None = None) -> Receiver:
        holder.append(await Receiver(statuses).start(ssl_context))
        return holder[-1]

    yield make
    for r in holder:
        await r.stop()


# --- delivery ------------------------------------------------------------------------------
async def test_retries_with_backoff_then_delivers(receiver) -> None:
    rx = await receiver([500, 500, 200])
    clock, outbox, results = Clock(), FakeOutbox(), []
    config = WebhookConfig(max_attempts=5, initial_backoff_seconds=2, max_backoff_seconds=3600)
    outbox.add(event(f"http://127.0.0.1:{rx.port}/hooks/runway?x=1"), clock.now)
    d = WebhookDispatcher(
        outbox, {"search-team": tenant(["127.0.0.1"])}, config, None, lambda t, r: results.append((t, r)), clock
    )
    start = clock.now

    assert await d.run_once() == 1
    assert outbox.finished[-1] == {
        "event_id": "evt_1",
        "delivered": False,
        "attempts": 1,
        "next_at": start + 2,
        "error": "http 500",
    }
    clock.now = start + 1.9
    assert await d.run_once() == 0  # not due yet
    clock.now = start + 2
    assert await d.run_once() == 1
    assert outbox.finished[-1] == {
        "event_id": "evt_1",
        "delivered": False,
        "attempts": 2,
        "next_at": start + 2 + 4,
        "error": "http 500",
    }
    clock.now = start + 6
    assert await d.run_once() == 1
    assert outbox.finished[-1] == {
        "event_id": "evt_1",
        "delivered": True,
        "attempts": 3,
        "next_at": None,
        "error": None,
    }
    clock.now = start + 10_000
    assert await d.run_once() == 0
    await d.aclose()

    assert [r["headers"]["x-gateway-delivery-attempt"] for r in rx.requests] == ["1", "2", "3"]
    assert {r["headers"]["x-gateway-event-id"] for r in rx.requests} == {"evt_1"}
    for r, at in zip(rx.requests, [start, start + 2, start + 6], strict=False):
        assert r["method"] == "POST" and r["target"] == "/hooks/runway?x=1" and r["body"] == BODY
        assert r["headers"]["host"] == f"127.0.0.1:{rx.port}"
        assert r["headers"]["content-type"] == "application/json"
        assert r["headers"]["user-agent"] == USER_AGENT
        assert r["headers"]["x-gateway-signature"].startswith(f"t={int(at)},")
        assert verify(SECRET, r["body"], r["headers"]["x-gateway-signature"], now=at)
    assert results == [("search-team", "failed"), ("search-team", "failed"), ("search-team", "delivered")]


async def test_a_rotated_secret_signs_with_both_during_its_grace_period(receiver) -> None:
    """A store tenant's webhook secret rotation: deliveries carry `v1=<new>,v1=<old>` until
    the grace period ends, then only the new one; read from the directory at each delivery."""
    rx = await receiver([200, 200])
    clock, outbox = Clock(), FakeOutbox()
    record = TenantRecord(
        "search-team",
        webhook_secret="whsec_new",
        policy={"hook_hosts": ["127.0.0.1"]},
        previous_webhook_secret="whsec_old",
        previous_webhook_secret_expires_at=clock.now + 60,
    )
    directory = Directory.build(Config(), DirectorySnapshot(1, [record], []))
    d = WebhookDispatcher(outbox, lambda: directory, clock=clock)
    outbox.add(event(f"http://127.0.0.1:{rx.port}/"), clock.now)
    assert await d.run_once() == 1
    clock.now += 60
    outbox.add(event(f"http://127.0.0.1:{rx.port}/", eid="evt_2"), clock.now)
    assert await d.run_once() == 1
    await d.aclose()
    during, after = (r["headers"]["x-gateway-signature"] for r in rx.requests)
    assert during.count("v1=") == 2 and after.count("v1=") == 1
    assert verify("whsec_old", BODY, during, now=clock.now) and verify("whsec_new", BODY, during, now=clock.now)
    assert verify("whsec_new", BODY, after, now=clock.now) and not verify("whsec_old", BODY, after, now=clock.now)


async def test_gives_up_after_max_attempts(receiver, caplog) -> None:
    rx = await receiver([500])
    clock, outbox, results = Clock(), FakeOutbox(), []
    config = WebhookConfig(max_attempts=3, initial_backoff_seconds=1, max_backoff_seconds=1.5)
    outbox.add(event(f"http://127.0.0.1:{rx.port}/"), clock.now)
    d = WebhookDispatcher(
        outbox, {"search-team": tenant(["127.0.0.1"])}, config, None, lambda t, r: results.append((t, r)), clock
    )
    with caplog.at_level(logging.WARNING, logger="gateway.webhooks"):
        for _ in range(3):
            assert await d.run_once() == 1
            clock.now += 1.5
        assert await d.run_once() == 0
    await d.aclose()
    assert [f["next_at"] for f in outbox.finished] == [1_000_000 + 1, 1_000_001.5 + 1.5, None]
    assert outbox.finished[-1]["attempts"] == 3 and not outbox.finished[-1]["delivered"]
    assert results == [("search-team", "failed"), ("search-team", "failed"), ("search-team", "gave_up")]
    [record] = [r for r in caplog.records if r.name == "gateway.webhooks" and r.levelno == logging.WARNING]
    line = json.loads(JSONFormatter().format(record))
    assert line["event"] == "webhook_gave_up" and line["level"] == "warning"
    assert line["event_id"] == "evt_1" and line["tenant"] == "search-team" and line["attempts"] == 3
    assert SECRET not in json.dumps(line) and "RUNNING" not in json.dumps(line)


async def test_no_signature_without_secret_and_concurrent_batch(receiver) -> None:
    rx = await receiver([204])
    clock, outbox = Clock(), FakeOutbox()
    for i in range(7):
        outbox.add(event(f"http://127.0.0.1:{rx.port}/", eid=f"evt_{i}"), clock.now)
    d = WebhookDispatcher(
        outbox, {"search-team": tenant(["127.0.0.1"], secret="")}, WebhookConfig(), None, None, clock, batch=5
    )
    assert await d.run_once() == 5
    assert await d.run_once() == 2
    await d.aclose()
    assert len(rx.requests) == 7 and all(f["delivered"] for f in outbox.finished)
    assert all("x-gateway-signature" not in r["headers"] for r in rx.requests)


@pytest.mark.parametrize(
    "url_template,hook_hosts",
    [
        ("http://127.0.0.1:{port}/", []),  # loopback, not listed
        ("http://127.0.0.1:{port}/", ["*.svc.internal"]),
        ("http://169.254.169.254/latest/meta-data", ["169.254.169.254"]),
        ("file:///etc/passwd", []),
    ],
)
async def test_refused_hook_is_a_failed_attempt_and_never_contacted(
    receiver, url_template: str, hook_hosts: list[str]
) -> None:
    rx = await receiver([200])
    clock, outbox, results = Clock(), FakeOutbox(), []
    outbox.add(event(url_template.format(port=rx.port)), clock.now)
    d = WebhookDispatcher(
        outbox, {"search-team": tenant(hook_hosts)}, WebhookConfig(), None, lambda t, r: results.append(r), clock
    )
    assert await d.run_once() == 1
    await d.aclose()
    assert rx.requests == []
    [finished] = outbox.finished
    assert finished["error"].startswith("refused: ")  # the rule, in the event's last_error
    assert finished == {"event_id": "evt_1", "delivered": False, "attempts": 1, "next_at": clock.now + 2} | {
        "error": finished["error"]
    }
    assert results == ["failed"]


async def test_dns_rebinding_name_resolving_to_loopback_is_refused(receiver) -> None:
    rx = await receiver([200])
    clock, outbox = Clock(), FakeOutbox()
    outbox.add(event(f"http://hooks.example.com:{rx.port}/"), clock.now)

    async def rebinding(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    d = WebhookDispatcher(outbox, {"search-team": tenant([])}, WebhookConfig(), None, None, clock, resolver=rebinding)
    assert await d.run_once() == 1
    await d.aclose()
    assert rx.requests == [] and outbox.finished[0]["delivered"] is False


async def test_unknown_tenant_gives_up_at_once() -> None:
    outbox, results = FakeOutbox(), []
    outbox.add(event("https://hooks.example.com/", tid="gone"), 0)
    d = WebhookDispatcher(outbox, {}, WebhookConfig(), None, lambda t, r: results.append((t, r)), Clock())
    assert await d.run_once() == 1
    assert outbox.finished[0]["next_at"] is None and results == [("gone", "gave_up")]


# --- connect to the checked address ----------------------------------------------------------
async def test_connects_to_checked_address_with_host_and_sni() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return (
            httpx.Response(302, headers={"location": "http://169.254.169.254/"})
            if len(seen) == 1
            else httpx.Response(200)
        )

    async def dns(host: str, port: int) -> list[str]:
        return {"a.svc.internal": ["10.0.0.8"]}[host]

    # A shared client with redirects on and an upstream credential: neither may leak into a delivery.
    client = httpx.AsyncClient(
        transport=httpx.MockTransport(handler),
        follow_redirects=True,
        headers={"authorization": "Bearer upstream-key"},
        cookies={"c": "1"},
    )
    clock, outbox, results = Clock(), FakeOutbox(), []
    outbox.add(event("https://a.svc.internal/hook?q=1"), clock.now)
    d = WebhookDispatcher(
        outbox,
        {"search-team": tenant(["*.svc.internal"])},
        WebhookConfig(),
        client,
        lambda t, r: results.append(r),
        clock,
        resolver=dns,
    )
    assert await d.run_once() == 1  # 302: a failure, and the redirect is not followed
    clock.now += 2
    assert await d.run_once() == 1
    await client.aclose()
    assert len(seen) == 2 and results == ["failed", "delivered"]
    for request in seen:
        assert str(request.url) == "https://10.0.0.8/hook?q=1"
        assert request.headers["host"] == "a.svc.internal"
        assert request.extensions["sni_hostname"] == "a.svc.internal"
        assert "authorization" not in request.headers and "cookie" not in request.headers


@pytest.mark.parametrize("hook_name,delivered", [("hooks.test", True), ("other.test", False)])
async def test_https_verifies_certificate_against_hook_name(
    receiver, tmp_path: Path, hook_name: str, delivered: bool
) -> None:
    """Connected to 127.0.0.1, TLS still checks the certificate against the hook's host name."""
    cert_file, key_file = self_signed(tmp_path, ["hooks.test"])
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert_file, key_file)
    rx = await receiver([200], server_ctx)

    async def dns(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    client = httpx.AsyncClient(
        verify=ssl.create_default_context(cafile=str(cert_file)), limits=httpx.Limits(max_keepalive_connections=0)
    )
    clock, outbox = Clock(), FakeOutbox()
    outbox.add(event(f"https://{hook_name}:{rx.port}/hook"), clock.now)
    d = WebhookDispatcher(
        outbox, {"search-team": tenant([hook_name])}, WebhookConfig(), client, None, clock, resolver=dns
    )
    assert await d.run_once() == 1
    await client.aclose()
    assert outbox.finished[0]["delivered"] is delivered
    if delivered:
        assert rx.requests[0]["headers"]["host"] == f"hooks.test:{rx.port}"
    else:
        assert rx.requests == []  # the handshake failed before any byte of the event was sent


async def test_run_forever_drains_and_stops(receiver) -> None:
    rx = await receiver([200])
    outbox, stop = FakeOutbox(), asyncio.Event()
    for i in range(3):
        outbox.add(event(f"http://127.0.0.1:{rx.port}/", eid=f"evt_{i}"), 0)
    d = WebhookDispatcher(outbox, {"search-team": tenant(["127.0.0.1"])}, WebhookConfig(), batch=2)
    task = asyncio.create_task(d.run_forever(stop, interval=0.01))
    for _ in range(200):
        if len(outbox.finished) == 3:
            break
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(task, 2)
    assert len(rx.requests) == 3 and all(f["delivered"] for f in outbox.finished)


def test_lease_must_outlast_timeout() -> None:
    with pytest.raises(ValueError):
        WebhookDispatcher(FakeOutbox(), {}, WebhookConfig(), lease=5.0, timeout=10.0)
