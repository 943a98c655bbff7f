"""Slow and idle clients cannot hold a worker: real sockets against `runway-gateway serve`.

The gateway here runs with one-second header, body and keep-alive timeouts, so each test
proves its limit in a few seconds; the defaults (10 s, 30 s, 5 s) differ only in number.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, GatewayProcess, Simulator, TenantSpec, gen2_body, wait_until

TIMEOUT = 1.0
# How long past a one-second deadline a close may take on a loaded two-core machine.
SLACK = 3.0


@pytest.fixture(scope="module")
def slow_gw(session_tmp: Path, sim: Simulator) -> Iterator[GatewayProcess]:
    g = GatewayProcess(
        session_tmp,
        sim.url,
        [TenantSpec("team-a")],
        callbacks=False,
        server_toml=(
            f"header_timeout_seconds = {TIMEOUT}\nbody_timeout_seconds = {TIMEOUT}\nkeepalive_timeout_seconds = {TIMEOUT}\n"
        ),
    )
    g.start()
    yield g
    g.stop()


class RawClient:
    """One TCP connection driven byte by byte."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.received = b""
        self.closed = False

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:  # the gateway closed it: what the tests wait for
            self.closed = True

    def poll(self) -> bool:
        """Read what has arrived without waiting; True once the gateway closed the connection."""
        self.sock.setblocking(False)
        try:
            while not self.closed:
                chunk = self.sock.recv(65536)
                if not chunk:
                    self.closed = True
                self.received += chunk
        except BlockingIOError:
            pass
        except OSError:
            self.closed = True
        finally:
            self.sock.setblocking(True)
        return self.closed

    def status_and_json(self) -> tuple[int, dict[str, str], dict]:
        head, _, body = self.received.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        return int(lines[0].split()[1]), headers, json.loads(body)

    def close(self) -> None:
        self.sock.close()


def trickle_until_closed(clients: list[RawClient], data: bytes, timeout: float = TIMEOUT + SLACK) -> float:
    """Each client sends `data` one byte per poll (a slowloris never stops sending) until
    the gateway closes every connection; return how long that took."""
    start = time.monotonic()
    sent = 0

    def step() -> bool:
        nonlocal sent
        for c in clients:
            if sent < len(data) and not c.poll():
                c.send(data[sent : sent + 1])
        sent += 1
        return all(c.poll() for c in clients)

    wait_until(step, timeout, 0.1, "the gateway to close slow connections")
    return time.monotonic() - start


SLOW_HEADERS = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"".join(
    b"X-Pad-%d: %s\r\n" % (i, b"x" * 20) for i in range(200)
)


def test_slow_headers_get_408_and_are_closed(slow_gw: GatewayProcess) -> None:
    clients = [RawClient(slow_gw.port) for _ in range(30)]
    try:
        assert trickle_until_closed(clients, SLOW_HEADERS) >= TIMEOUT * 0.9
        for c in clients:
            status, headers, body = c.status_and_json()
            assert status == 408 and headers["connection"] == "close"
            assert body["error"]["code"] == "request_timeout" and body["error"]["type"] == "invalid_request_error"
    finally:
        for c in clients:
            c.close()
    assert httpx.get(slow_gw.url + "/healthz", timeout=5).status_code == 200


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(slow_gw: GatewayProcess) -> None:
    c = RawClient(slow_gw.port)
    try:
        wait_until(c.poll, TIMEOUT + SLACK, 0.1, "the gateway to close a silent connection")
        assert c.received == b""
    finally:
        c.close()


def _create_head(tenant: TenantSpec, length: int) -> bytes:
    return (
        f"POST /runway/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {tenant.key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def test_a_stalled_body_gets_408_and_the_connection_closes(slow_gw: GatewayProcess) -> None:
    body = json.dumps(gen2_body()).encode()
    c = RawClient(slow_gw.port)
    try:
        c.send(_create_head(slow_gw.tenants["team-a"], len(body)) + body[:10])
        trickle_until_closed([c], body[10:-1])  # never the last byte
        status, headers, err = c.status_and_json()
        assert status == 408 and headers["connection"] == "close", c.received
        assert err["error"]["code"] == "request_timeout"
    finally:
        c.close()
    line = wait_until(
        lambda: [r for r in slow_gw.access_log() if r.get("status") == 408], 5, 0.1, "the 408 access log line"
    )
    assert line[-1]["route"] == "/runway/tasks" and line[-1]["tenant"] == "team-a"


def test_a_body_trickling_after_the_answer_is_cut_off(slow_gw: GatewayProcess) -> None:
    """No key: the gateway answers 401 without reading the body; a client that goes on
    trickling it is closed at the body deadline (uvicorn alone re-armed nothing)."""
    c = RawClient(slow_gw.port)
    try:
        c.send(b"POST /runway/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10000\r\n\r\n{")
        trickle_until_closed([c], b" " * 1000)
        assert c.received.startswith(b"HTTP/1.1 401 ")
    finally:
        c.close()


def test_idle_keepalive_connection_closes(slow_gw: GatewayProcess) -> None:
    c = RawClient(slow_gw.port)
    try:
        c.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        wait_until(lambda: c.poll() or b"\r\n\r\n" in c.received, 5, 0.05, "the /healthz answer")
        assert c.received.startswith(b"HTTP/1.1 200 ") and not c.closed
        answered = time.monotonic()
        wait_until(c.poll, TIMEOUT + SLACK, 0.1, "the gateway to close an idle keep-alive connection")
        assert time.monotonic() - answered >= TIMEOUT * 0.9  # idle, not refused
    finally:
        c.close()


def test_slow_headers_of_a_later_request_on_a_keepalive_connection_get_408_and_are_closed(
    slow_gw: GatewayProcess,
) -> None:
    """The header deadline is per request: the second request of a kept-alive connection
    that trickles its headers is cut like the first request of a connection (408, close),
    its deadline counted from its own first byte."""
    c = RawClient(slow_gw.port)
    try:
        c.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")

        def answered() -> bool:
            head, sep, body = c.received.partition(b"\r\n\r\n")
            length = [ln for ln in head.lower().split(b"\r\n") if ln.startswith(b"content-length: ")]
            return c.poll() or bool(sep and length and len(body) >= int(length[0].split(b": ")[1]))

        wait_until(answered, 5, 0.01, "the first answer")
        assert c.received.startswith(b"HTTP/1.1 200 ") and not c.closed
        c.received = b""
        took = trickle_until_closed([c], SLOW_HEADERS)
        assert took >= TIMEOUT * 0.9
        status, headers, body = c.status_and_json()
        assert status == 408 and headers["connection"] == "close"
        assert body["error"]["code"] == "request_timeout"
    finally:
        c.close()


def test_keepalive_connection_serves_requests_within_the_limits(slow_gw: GatewayProcess) -> None:
    """The deadlines are per request: one connection used for longer than any of them works."""
    c = RawClient(slow_gw.port)
    try:
        start, answers = time.monotonic(), 0
        while time.monotonic() - start < TIMEOUT * 2.5:
            c.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answers += 1
            wait_until(
                lambda answers=answers: c.poll() or c.received.count(b"HTTP/1.1 200 ") == answers,
                5,
                0.01,
                f"answer {answers}",
            )
            assert not c.closed, c.received[-500:]
    finally:
        c.close()


def test_connections_beyond_the_limit_get_503_until_they_close(tmp_path: Path, sim: Simulator) -> None:
    g = GatewayProcess(
        tmp_path,
        sim.url,
        [TenantSpec("team-a")],
        callbacks=False,
        server_toml="max_connections_per_worker = 4\nheader_timeout_seconds = 30\n",
    )
    g.start()
    holders: list[RawClient] = []
    try:
        holders = [RawClient(g.port) for _ in range(4)]

        def refused() -> httpx.Response | None:
            r = httpx.get(g.url + "/healthz", timeout=5)
            return r if r.status_code == 503 else None

        r = wait_until(refused, 10, 0.1, "a 503 beyond the connection limit")
        assert r.json()["error"]["code"] == "server_busy"
        assert r.headers["retry-after"] == "1" and r.headers["connection"] == "close"
        for h in holders:
            h.close()
        wait_until(
            lambda: httpx.get(g.url + "/healthz", timeout=5).status_code == 200, 10, 0.1, "a 200 once they closed"
        )
    finally:
        for h in holders:
            h.close()
        g.stop()


def test_check_config_refuses_unusable_limits(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[server]\nheader_timeout_seconds = 0\nbody_timeout_seconds = "30"\nkeepalive_timeout_seconds = -1\n'
        'max_connections_per_worker = 1.5\n[upstream]\nbase_url = "http://127.0.0.1:1"\napi_keys = ["k"]\n'
    )
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(bad)], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 2
    problems = out.stderr.strip().splitlines()
    for expected in (
        "server.header_timeout_seconds: must be a positive number",
        "server.body_timeout_seconds: must be a positive number",
        "server.keepalive_timeout_seconds: must be a positive number",
        "server.max_connections_per_worker: must be a positive integer",
    ):
        assert expected in problems, (expected, problems)


class _Wire:
    """A transport that records its writes."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


class _Cycle:
    def __init__(self) -> None:
        self.response_started = False
        self.response_complete = False


class _Protocol:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.cycle: _Cycle | None = None


async def test_a_response_head_leaves_with_its_body_in_one_write() -> None:
    """uvicorn writes a head, then a body: the connection's transport sends them as one
    write (one segment, one syscall); a head without a body in its turn, or before a
    close, still leaves; writes outside a response pass straight through."""
    from gateway.connections import HeadHoldingTransport

    wire, protocol = _Wire(), _Protocol(asyncio.get_running_loop())
    transport = HeadHoldingTransport(wire, protocol)  # type: ignore[arg-type]
    transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # no response started: straight through
    protocol.cycle = first = _Cycle()
    first.response_started = True
    transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    assert wire.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    transport.write(b"{}")
    assert wire.writes[1:] == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
    first.response_complete = True
    await asyncio.sleep(0)  # the turn's end: nothing left to send
    assert len(wire.writes) == 2

    protocol.cycle = second = _Cycle()
    second.response_started = True
    transport.write(b"HTTP/1.1 204 No Content\r\n\r\n")  # its body never comes
    assert len(wire.writes) == 2
    await asyncio.sleep(0)
    assert wire.writes[2:] == [b"HTTP/1.1 204 No Content\r\n\r\n"]

    protocol.cycle = third = _Cycle()
    third.response_started = True
    transport.write(b"HTTP/1.1 500 Internal Server Error\r\n\r\n")
    transport.close()  # closed before the turn ends: the head still goes first
    assert wire.writes[3:] == [b"HTTP/1.1 500 Internal Server Error\r\n\r\n"] and wire.closed
    assert transport.get_extra_info("peername") == "info:peername"
