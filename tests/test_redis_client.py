"""gateway/store/redis/client.py against a real Redis: replies in order whatever the mix,
one write per loop turn, EVALSHA with its NOSCRIPT fallback, and failures that fail the
waiting commands (never retry them) and leave the client able to reconnect.

Keys live under a prefix of this module's own and are deleted at the end (never FLUSHDB).
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import RedisServer, eventually, free_port, self_signed

from gateway.config import ConfigError, load_config
from gateway.store.base import StoreUnavailable
from gateway.store.redis.client import KEEPALIVE, RedisClient, RedisConnectionError, RedisError, pack
from gateway.store.redis.url import Address, parse_url


@pytest.fixture
def base_url(redis_url: str) -> str:
    return redis_url


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[RedisClient]:
    c = RedisClient(base_url, socket_timeout=2.0)
    yield c
    await c.aclose()


@pytest.fixture
async def prefix(base_url: str) -> AsyncIterator[str]:
    p = f"rctest:{uuid.uuid4().hex[:8]}:"
    yield p
    cleaner = RedisClient(base_url)
    keys = await cleaner.execute("KEYS", p + "*")
    if keys:
        await cleaner.execute("DEL", *keys)
    await cleaner.aclose()


def test_urls_and_encoding() -> None:
    assert parse_url("redis://127.0.0.1:6380/3") == Address("127.0.0.1", 6380, 3)
    assert parse_url("redis://:p%40ss@redis.example") == Address("redis.example", 6379, 0, None, "p@ss")
    assert parse_url("rediss://app:secret@h:1/2") == Address("h", 1, 2, "app", "secret", tls=True)
    assert parse_url("rediss://h/0?ssl_ca_certs=/ca.pem&ssl_certfile=/c.pem&ssl_keyfile=/k.pem") == Address(
        "h", 6379, 0, tls=True, ssl_ca_certs="/ca.pem", ssl_certfile="/c.pem", ssl_keyfile="/k.pem"
    )
    for bad in ("http://h/0", "redis://h/zero", "redis://h:port/0"):
        with pytest.raises(ValueError):
            parse_url(bad)
    assert pack(("SET", b"k\r\n", 7, 0.1)) == b"*4\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$1\r\n7\r\n$3\r\n0.1\r\n"
    with pytest.raises(TypeError):
        pack(("SET", None))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis://h:6379/zero", "store.url: the Redis database must be a number"),
        ("redis://h:port/0", "store.url: the Redis port must be a number"),
        ("unix:///run/redis.sock", "store.url: must be sqlite:///PATH or redis[s]://"),
        ("rediss://h/0?ssl_ca_cert=/ca.pem", "store.url: unknown Redis URL parameter 'ssl_ca_cert'"),
        ("redis://h/0?ssl_ca_certs=/ca.pem", "store.url: ssl_ca_certs needs a rediss:// URL"),
        ("rediss://h/0?ssl_ca_certs=ca.pem", "store.url: ssl_ca_certs must be an absolute file path"),
        ("rediss://h/0?ssl_ca_certs=/nonexistent/ca.pem", "store.url: ssl_ca_certs /nonexistent/ca.pem: No such file"),
        ("rediss://h/0?ssl_certfile=/etc/hostname", "store.url: ssl_certfile/ssl_keyfile /etc/hostname: "),
        ("rediss://h/0?ssl_keyfile=/etc/hostname", "store.url: ssl_keyfile needs ssl_certfile"),
    ],
)
def test_check_config_reports_a_redis_url_the_client_cannot_use(tmp_path: Path, url: str, problem: str) -> None:
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(
        f'[upstream]\nbase_url = "http://127.0.0.1:9"\napi_keys = ["k"]\n[store]\nurl = "{url}"\n'
        f'[[tenants]]\nid = "t"\nkeys = ["sha256:{"0" * 64}"]\n'
    )
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert any(p.startswith(problem) for p in err.value.problems), err.value.problems
    cfg.write_text(cfg.read_text().replace(url, "rediss://user:pw@h:6380/2?prefix=gw:"))
    assert load_config(cfg).store.url == "rediss://user:pw@h:6380/2?prefix=gw:"


async def test_values_round_trip_byte_for_byte(client: RedisClient, prefix: str) -> None:
    blob = bytes(range(256)) * 20_000 + b"\r\n\0end"  # ~5 MB with CR LF and NUL inside
    assert await client.execute("SET", prefix + "blob", blob) == b"OK"
    assert await client.execute("GET", prefix + "blob") == blob
    assert await client.execute("GET", prefix + "missing") is None
    assert await client.execute("HSET", prefix + "h", "a", "ü", "b", 2) == 2
    assert await client.execute("HGETALL", prefix + "h") == [b"a", "ü".encode(), b"b", b"2"]
    assert await client.execute("EVAL", "return {1, 'x', {2, false}}", 0) == [1, b"x", [2, None]]
    await client.ping()


async def test_an_error_reply_fails_its_command_only(client: RedisClient, prefix: str) -> None:
    await client.execute("SET", prefix + "s", "text")
    results = await asyncio.gather(
        client.execute("SET", prefix + "n", 41),
        client.execute("INCR", prefix + "s"),
        client.execute("INCR", prefix + "n"),
        return_exceptions=True,
    )
    assert results[0] == b"OK" and results[2] == 42
    assert isinstance(results[1], RedisError) and "not an integer" in str(results[1])


async def test_commands_of_one_turn_go_in_one_write_and_replies_keep_their_order(
    client: RedisClient, prefix: str
) -> None:
    await client.ping()  # connected
    writes = client.writes
    key = prefix + "counter"
    replies = await asyncio.gather(*(client.execute("INCR", key) for _ in range(500)))
    assert replies == list(range(1, 501))  # gather keeps call order: each caller got its own reply
    assert client.writes - writes == 1
    assert await client.execute("GET", key) == b"500"


async def test_scripts_run_by_sha_and_survive_a_script_flush(client: RedisClient, prefix: str) -> None:
    script = client.register_script("return redis.call('INCR', KEYS[1])")
    await client.load_scripts()
    key = prefix + "runs"
    assert await script(keys=[key]) == 1
    assert await client.execute("SCRIPT", "FLUSH") == b"OK"  # as after a Redis restart
    assert await script(keys=[key]) == 2  # NOSCRIPT: did not run; EVAL ran it once
    assert await script(keys=[key]) == 3
    broken = client.register_script("return redis.call('NOSUCHCOMMAND')")
    with pytest.raises(RedisError):
        await broken()


async def test_a_late_reply_fails_the_waiting_commands_and_the_next_one_reconnects(base_url: str, prefix: str) -> None:
    client = RedisClient(base_url, socket_timeout=0.3)
    try:
        await client.ping()
        started = time.monotonic()
        blocked = asyncio.gather(
            client.execute("BLPOP", prefix + "never", 5), client.execute("PING"), return_exceptions=True
        )
        first, second = await blocked
        assert isinstance(first, RedisConnectionError) and isinstance(second, RedisConnectionError)
        assert "0.3" in str(first) and time.monotonic() - started < 2.0
        assert await client.execute("SET", prefix + "after", "ok") == b"OK"  # a new connection
    finally:
        await client.aclose()


async def test_a_connection_killed_by_the_server_fails_then_reconnects(
    client: RedisClient, base_url: str, prefix: str
) -> None:
    my_id = await client.execute("CLIENT", "ID")
    waiting = asyncio.ensure_future(client.execute("BLPOP", prefix + "never", 5))
    admin = RedisClient(base_url)
    try:

        async def blocked() -> bool:
            return b"cmd=blpop" in await admin.execute("CLIENT", "LIST", "ID", my_id)

        await eventually(blocked, message="the BLPOP to block on the server")
        assert await admin.execute("CLIENT", "KILL", "ID", my_id) == 1
    finally:
        await admin.aclose()
    with pytest.raises(RedisConnectionError):
        await asyncio.wait_for(waiting, 2)
    assert await client.execute("CLIENT", "ID") != my_id


async def test_a_cancelled_caller_does_not_shift_the_replies(client: RedisClient, prefix: str) -> None:
    await client.execute("SET", prefix + "k", "v")
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(client.execute("BLPOP", prefix + "never", 0.2), 0.05)
    # The BLPOP's nil reply arrives later and is dropped; these get their own replies. One
    # connection answers in order, so when they are answered the nil has come and gone.
    assert await asyncio.gather(client.execute("GET", prefix + "k"), client.execute("ECHO", "x")) == [b"v", b"x"]
    assert await client.execute("GET", prefix + "k") == b"v"


def test_on_uvloop_as_the_server_runs_it(base_url: str) -> None:
    """uvicorn[standard] serves on uvloop, whose transports and timers are its own."""
    import uvloop

    async def main() -> tuple[list[Any], int]:
        c = RedisClient(base_url, socket_timeout=0.3)
        try:
            await c.ping()
            writes = c.writes
            replies = await asyncio.gather(*(c.execute("ECHO", str(i)) for i in range(100)))
            writes = c.writes - writes
            with pytest.raises(RedisConnectionError):
                await c.execute("BLPOP", f"rctest:{uuid.uuid4().hex}", 2)
            return [*replies, await c.execute("ECHO", "again")], writes
        finally:
            await c.aclose()

    replies, writes = uvloop.run(main())
    assert replies == [str(i).encode() for i in range(100)] + [b"again"] and writes == 1


async def test_nothing_listening_fails_fast() -> None:
    client = RedisClient("redis://127.0.0.1:1/0", connect_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(RedisConnectionError, match="cannot connect"):
        await client.execute("PING")
    assert time.monotonic() - started < 1.5


async def test_the_url_selects_the_database(base_url: str, prefix: str) -> None:
    host = base_url.split("://", 1)[1].split("/", 1)[0]
    on15, on0 = RedisClient(f"redis://{host}/15"), RedisClient(f"redis://{host}/0")
    try:
        await on15.execute("SET", prefix + "db", "15")
        assert await on15.execute("GET", prefix + "db") == b"15"
        assert await on0.execute("GET", prefix + "db") is None
    finally:
        await on15.execute("DEL", prefix + "db")
        await on15.aclose()
        await on0.aclose()


async def test_callers_waiting_for_a_connection_share_its_failure() -> None:
    """A server that accepts but never answers (a hung Redis): SELECT times out once for all
    the waiting callers, not once per caller, and the half-open socket is closed."""
    closed = asyncio.Event()
    accepted = 0

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        await reader.read()  # until the client closes
        closed.set()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = RedisClient(f"redis://127.0.0.1:{port}/1", socket_timeout=0.3)
    try:
        started = time.monotonic()
        results = await asyncio.gather(*(client.execute("PING") for _ in range(5)), return_exceptions=True)
        assert all(isinstance(r, RedisConnectionError) for r in results), results
        assert accepted == 1  # one connection attempt for the five callers
        assert time.monotonic() - started < 1.2  # one 0.3 s timeout, not five in a row
        await asyncio.wait_for(closed.wait(), 1)
        # A caller cancelled during the setup does not leave the socket open either.
        closed.clear()
        waiting = asyncio.ensure_future(client.execute("PING"))
        await eventually(lambda: accepted == 2, message="the second connection")  # SELECT is waiting
        waiting.cancel()
        await asyncio.wait_for(closed.wait(), 1)
        # aclose() during the setup: the waiting caller fails as closed, the socket is closed.
        closed.clear()
        waiting = asyncio.ensure_future(client.execute("PING"))
        await eventually(lambda: accepted == 3, message="the third connection")
        await client.aclose()
        with pytest.raises(RedisConnectionError, match="closed"):
            await waiting
        await asyncio.wait_for(closed.wait(), 1)
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own: the test changes its role."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize("reply", ["READONLY", "MASTERDOWN"])
async def test_a_failover_reply_drops_the_connection_and_the_next_command_reconnects(
    own_server: RedisServer, monkeypatch: pytest.MonkeyPatch, reply: str
) -> None:
    """After a failover the old primary answers READONLY (or, as a replica cut off from its
    primary, MASTERDOWN) on a connection that is still open. The client drops it, failing
    that command and the ones queued behind it as StoreUnavailable, and the next command
    connects again, looking the host name up again (where a moved DNS name points now)."""
    loop = asyncio.get_running_loop()
    lookups: list[str] = []
    resolve = loop.getaddrinfo

    async def counting(host: Any, *args: Any, **kw: Any) -> Any:
        lookups.append(host)
        return await resolve(host, *args, **kw)

    monkeypatch.setattr(loop, "getaddrinfo", counting)
    admin = own_server.client()
    client = RedisClient(f"redis://localhost:{own_server.port}/0")
    try:
        first_id = await client.execute("CLIENT", "ID")
        assert lookups == ["localhost"]
        admin.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))  # demoted; its primary is not there
        if reply == "MASTERDOWN":
            admin.config_set("replica-serve-stale-data", "no")
        command = ("SET", "k", "v") if reply == "READONLY" else ("GET", "k")
        refused, queued = await asyncio.gather(
            client.execute(*command), client.execute("ECHO", "behind"), return_exceptions=True
        )
        assert (
            isinstance(refused, RedisConnectionError)
            and isinstance(refused, StoreUnavailable)
            and reply in str(refused)
        )
        assert queued is refused  # dropped with the connection
        admin.execute_command("REPLICAOF", "NO", "ONE")  # promoted again
        assert await client.execute("SET", "k", "v") == b"OK"
        assert await client.execute("CLIENT", "ID") != first_id  # a new connection
        assert lookups == ["localhost", "localhost"]
    finally:
        await client.aclose()


async def test_the_connection_has_tcp_keepalive(client: RedisClient) -> None:
    """A Redis that vanished without closing (host gone, NAT entry dropped) is noticed on an
    idle connection too, not only when a command times out."""
    await client.ping()
    assert client._conn is not None and client._conn.transport is not None
    sock = client._conn.transport.get_extra_info("socket")
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPALIVE["TCP_KEEPIDLE"]


async def test_rediss_with_a_private_ca_and_a_client_certificate(tmp_path: Path) -> None:
    """`ssl_ca_certs` makes the client trust a private CA, `ssl_certfile`/`ssl_keyfile`
    present a client certificate to a Redis that requires one (tls-auth-clients yes)."""
    (tmp_path / "server").mkdir()
    (tmp_path / "client").mkdir()
    server_cert, server_key = self_signed(tmp_path / "server", ["localhost"])
    client_cert, client_key = self_signed(tmp_path / "client", ["gateway"])
    tls_port = free_port()
    server = RedisServer(
        tmp_path,
        extra=(
            "--tls-port",
            str(tls_port),
            "--tls-cert-file",
            str(server_cert),
            "--tls-key-file",
            str(server_key),
            "--tls-ca-cert-file",
            str(client_cert),
            "--tls-auth-clients",
            "yes",
        ),
    )
    server.start()
    base = f"rediss://localhost:{tls_port}/0"
    try:
        trusted = RedisClient(f"{base}?ssl_ca_certs={server_cert}&ssl_certfile={client_cert}&ssl_keyfile={client_key}")
        try:
            assert await trusted.execute("ECHO", "over TLS") == b"over TLS"
        finally:
            await trusted.aclose()
        for url in (f"{base}?ssl_ca_certs={server_cert}", base):  # no client certificate; no private CA
            refused = RedisClient(url)
            try:
                with pytest.raises(RedisConnectionError):
                    await refused.execute("PING")
            finally:
                await refused.aclose()
    finally:
        server.stop()
