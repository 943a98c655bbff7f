"""Shared fixtures: real processes on loopback ports.

- `sim`: the bundled upstream simulator, one per session (reset it in tests that change it).
- `gw`: a gateway (`runway-gateway serve`, SQLite) in front of `sim`, one per session, with
  a few tenants of different limits; its JSON log lines go to a file tests can read.
- `GatewayProcess` / `start_gateway`: for tests that need their own config, several
  workers, Redis, or to kill and restart a gateway.
- `redis_url`: the session's Redis. A private `redis-server` (free port, temp dir, nothing
  saved) started for the session and stopped after it, unless `GATEWAY_TEST_REDIS_URL`
  names one explicitly: then exactly that one, which must answer. The suite never touches a
  Redis it did not make or was not given; Redis-backed tests fail (never skip) when
  `redis-server` cannot start. Each test still uses a key prefix of its own.
- `RedisServer`: a private `redis-server` of a test's own (to stop, restart or demote).
- `wait_until` / `eventually`: poll for a state (sync / async); tests never sleep a fixed time
  to wait for one.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import http.client
import inspect
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM_KEY = "sk-sim-upstream-test-7f3a9c"
ADMIN_KEY = "sk-gw-admin-test-1c9e44"
STARTUP_LINE = "Application startup complete"  # uvicorn logs it once per worker, after the lifespan
REDIS_ENV = "GATEWAY_TEST_REDIS_URL"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def key_hash(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def wait_until(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, message: str = "condition"
) -> Any:
    """Poll `predicate` until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def probe(base_url: str, path: str, secret: str) -> http.client.HTTPResponse:
    """One GET on a new TCP connection (so each may land on any worker), read whole.

    For tests that time how fast a change reaches every replica: http.client costs well
    under a millisecond here, where `httpx.get` builds a client and loads the CA bundle on
    each call (~20 ms on this machine), which a 1 s bound cannot afford many times over."""
    host, _, port = base_url.removeprefix("http://").partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {secret}"})
        response = conn.getresponse()
        response.read()
        return response
    finally:
        conn.close()


async def eventually(
    check: Callable[[], Any], within: float = 5.0, interval: float = 0.02, message: str = "condition"
) -> Any:
    """`wait_until` for async tests: poll `check()` (sync or async) without blocking the
    event loop until it returns something truthy; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {message}")
        await asyncio.sleep(interval)


def gen2_body(prompt: str = "The wind blows hair up.", **gen2: Any) -> dict[str, Any]:
    """A create body in the relay's documented shape."""
    options = {
        "mode": "gen2",
        "interpolate": False,
        "upscale": False,
        "watermark": False,
        "motion_score": 22,
        "use_motion_score": True,
        "use_motion_vectors": False,
        "text_prompt": prompt,
    }
    options.update(gen2)
    return {
        "taskType": "gen2",
        "internal": False,
        "options": {"name": "test", "gen2Options": options, "exploreMode": False, "assetGroupName": "Generative Video"},
    }


# --- processes -----------------------------------------------------------------------


class Process:
    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.args, self.log_path = args, log_path
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT, start_new_session=True
        )
        log.close()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=15)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _wait_http(url: str, proc: Process, timeout: float = 20.0) -> None:
    def up() -> bool:
        if proc.proc is not None and proc.proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.proc.returncode}):\n{proc.log_text()[-3000:]}")
        try:
            return httpx.get(url, timeout=1.0).status_code < 500
        except httpx.HTTPError:
            return False

    wait_until(up, timeout, 0.1, url)


class Simulator(Process):
    def __init__(self, tmp: Path, seconds_to_finish: float = 1.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(
            [
                sys.executable,
                "-m",
                "gateway",
                "simulate-upstream",
                "--port",
                str(self.port),
                "--seconds-to-finish",
                str(seconds_to_finish),
                "--api-key",
                UPSTREAM_KEY,
            ],
            tmp / f"sim-{self.port}.log",
        )

    def start(self) -> None:
        super().start()
        _wait_http(self.url + "/_sim/control", self)

    def control(self, **fields: Any) -> None:
        httpx.post(self.url + "/_sim/control", json=fields, timeout=5).raise_for_status()

    def reset(self) -> None:
        httpx.post(self.url + "/_sim/reset", timeout=5).raise_for_status()

    def requests(self) -> dict[str, Any]:
        return httpx.get(self.url + "/_sim/requests", timeout=5).json()

    def tasks(self) -> list[dict[str, Any]]:
        return httpx.get(self.url + "/_sim/tasks", timeout=5).json()["tasks"]


@dataclass
class TenantSpec:
    id: str
    key: str = field(default_factory=lambda: "sk-gw-test-" + secrets.token_urlsafe(24))
    limits: dict[str, int] = field(default_factory=dict)
    webhook_secret: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    hook_hosts: tuple[str, ...] = ("127.0.0.1",)
    enabled: bool = True
    extra: str = ""  # more TOML under [[tenants]] (e.g. a policy table)

    def headers(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}", **extra}

    def toml(self) -> str:
        lines = [
            "[[tenants]]",
            f'id = "{self.id}"',
            f'keys = ["{key_hash(self.key)}"]',
            f'webhook_secret = "{self.webhook_secret}"',
            f"enabled = {str(self.enabled).lower()}",
        ]
        if self.limits:
            lines.append("[tenants.limits]")
            lines += [f"{k} = {v}" for k, v in self.limits.items()]
        lines.append("[tenants.policy]")
        lines.append("hook_hosts = [" + ", ".join(f'"{h}"' for h in self.hook_hosts) + "]")
        if self.extra:
            lines.append(self.extra)
        return "\n".join(lines) + "\n"


class GatewayProcess(Process):
    """`runway-gateway serve` with a config written from arguments."""

    def __init__(
        self,
        tmp: Path,
        upstream_url: str,
        tenants: list[TenantSpec],
        *,
        store_url: str | None = None,
        callbacks: bool = True,
        workers: int = 1,
        extra_toml: str = "",
        upstream_section: str = "",
        port: int | None = None,
        env: dict[str, str] | None = None,
        artifact_hosts: tuple[str, ...] = ("127.0.0.1",),
        server_toml: str = "",
    ):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workers = workers
        self.tenants = {t.id: t for t in tenants}
        name = f"gw-{self.port}"
        self.config_path = tmp / f"{name}.toml"
        store_url = store_url or f"sqlite:///{tmp / (name + '.db')}"
        public_url = self.url if callbacks else ""
        self.config_path.write_text(
            f'[server]\npublic_url = "{public_url}"\nmax_body_bytes = 65536\n{server_toml}\n'
            f'[upstream]\nbase_url = "{upstream_url}"\napi_keys = ["{UPSTREAM_KEY}"]\ntimeout_seconds = 3\n'
            f"poll_interval_seconds = 1\nartifact_hosts = {list(artifact_hosts)!r}\n{upstream_section}\n"
            f'[store]\nurl = "{store_url}"\n\n[admin]\nkeys = ["{key_hash(ADMIN_KEY)}"]\n\n[webhooks]\ninitial_backoff_seconds = 0.2\nmax_backoff_seconds = 1\n\n'
            f"{extra_toml}\n" + "\n".join(t.toml() for t in tenants)
        )
        super().__init__(
            [
                sys.executable,
                "-m",
                "gateway",
                "serve",
                "--config",
                str(self.config_path),
                "--port",
                str(self.port),
                "--workers",
                str(workers),
            ],
            tmp / f"{name}.log",
            env,
        )

    def start(self) -> None:
        started = self.log_text().count(STARTUP_LINE)  # the log file is kept across restarts
        super().start()
        _wait_http(self.url + "/healthz", self)
        _wait_http(self.url + "/readyz", self)
        # /readyz reached one worker: with --workers N wait until each has run its startup
        wait_until(
            lambda: self.log_text().count(STARTUP_LINE) >= started + self.workers, 30, 0.05, "every worker started"
        )

    def client(self, tenant: str, **kw: Any) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers=self.tenants[tenant].headers(), timeout=kw.pop("timeout", 10), **kw
        )

    def usage(self, tenant: str) -> dict[str, int]:
        resp = httpx.get(
            f"{self.url}/admin/tenants/{tenant}/usage", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=5
        )
        resp.raise_for_status()
        return resp.json()["usage"]

    def access_log(self) -> list[dict[str, Any]]:
        import json

        lines = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    pass
        return lines


# --- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("procs")


@pytest.fixture(scope="session")
def sim(session_tmp: Path) -> Iterator[Simulator]:
    s = Simulator(session_tmp)
    s.start()
    yield s
    s.stop()


DEFAULT_TENANTS = lambda: [  # noqa: E731 - a fresh list per session
    TenantSpec("team-a"),
    TenantSpec("team-b"),
    TenantSpec("team-off", enabled=False),
    TenantSpec("team-policy", extra="force = { watermark = true }\ndefaults = { motion_score = 7 }"),
]


@pytest.fixture(scope="session")
def gw(session_tmp: Path, sim: Simulator) -> Iterator[GatewayProcess]:
    g = GatewayProcess(session_tmp, sim.url, DEFAULT_TENANTS())
    g.start()
    yield g
    g.stop()


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    """Start gateways with their own config; all stopped at the end of the test."""
    started: list[GatewayProcess] = []

    def start(upstream_url: str, tenants: list[TenantSpec], **kw: Any) -> GatewayProcess:
        g = GatewayProcess(tmp_path, upstream_url, tenants, **kw)
        g.start()
        started.append(g)
        return g

    yield start
    for g in started:
        g.stop()


@pytest.fixture
def own_sim(tmp_path: Path) -> Iterator[Simulator]:
    """A simulator of this test's own, free to misbehave."""
    s = Simulator(tmp_path)
    s.start()
    yield s
    s.stop()


class RedisServer(Process):
    """A `redis-server` of the tests' own on 127.0.0.1: a free port (or a given one, to
    restart it there), its own directory, nothing saved (`--save '' --appendonly no`).
    `extra` adds server options, e.g. `("--replicaof", "127.0.0.1", "6390")`."""

    def __init__(self, tmp: Path, port: int | None = None, extra: tuple[str, ...] = ()):
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (apt-get install redis-server; .ci/run installs it)")
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        workdir = tmp / f"redis-{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        args = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
            *extra,
        ]
        super().__init__(args, tmp / f"redis-{self.port}.log")

    def start(self) -> None:
        super().start()

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"redis-server exited ({self.proc.returncode}):\n{self.log_text()[-3000:]}")
            return self.answers()

        wait_until(up, 10, 0.05, f"redis-server on port {self.port}")

    def answers(self) -> bool:
        import redis

        try:
            return bool(self.client(socket_connect_timeout=0.5).ping())
        except redis.exceptions.RedisError:
            return False

    def client(self, **kw: Any) -> Any:
        """A redis-py client for the test's own checks and commands (REPLICAOF, ROLE)."""
        import redis

        return redis.Redis(port=self.port, **kw)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The session's Redis URL: GATEWAY_TEST_REDIS_URL when given (it must answer), else a
    private redis-server started here and stopped at the end of the session."""
    import redis

    given = os.environ.get(REDIS_ENV)
    if given:
        try:
            redis.Redis.from_url(given, socket_connect_timeout=2).ping()
        except redis.exceptions.RedisError as exc:
            pytest.fail(f"{REDIS_ENV}={given} is set but Redis does not answer: {exc}")
        yield given
        return
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_store_url(redis_url: str) -> Iterator[str]:
    """A Redis URL whose keys live under a prefix of this test's own, deleted afterwards."""
    import redis

    prefix = f"gwtest-{secrets.token_hex(4)}:"
    yield f"{redis_url}{'&' if '?' in redis_url else '?'}prefix={prefix}"
    r = redis.Redis.from_url(redis_url)
    for key in r.scan_iter(match=prefix + "*", count=1000):
        r.delete(key)


def self_signed(tmp_path: Path, dns_names: list[str], ips: list[str] | None = None) -> tuple[Path, Path]:
    """A self-signed certificate (its own CA) for `dns_names` and `ips`, valid for an hour:
    the PEM files of the certificate and its key in `tmp_path`."""
    assert not isinstance(dns_names, str), "dns_names is a list of names"
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (dns_names or ips or [""])[0])])
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips or []]
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file
