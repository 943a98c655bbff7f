"""A lean asyncio Redis client: one connection, the commands of a loop turn in one write.

Why not redis-py: its asyncio client spends several times more CPU per command (a pool
checkout, a timeout context, packing and parsing in Python; docs/benchmarks.md), and the
Redis store sends one Lua script per request, so that was most of a Redis-backed
request's cost. This client does only what the store needs:

- commands are RESP arrays of bulk strings; replies are parsed by `hiredis` (C);
- auto-pipelining: every command issued in one event-loop turn goes out in one write and
  the replies come back in order (Redis runs commands one at a time anyway, so one
  connection per process is enough);
- it never retries: a command whose reply did not come may have run (a script that charged
  a quota), so the caller gets `RedisConnectionError` and decides;
- a reply that takes longer than `socket_timeout` kills the connection and fails every
  command still waiting on it (their replies could no longer be matched); the next
  command connects again;
- failover: a `READONLY`, `LOADING` or `MASTERDOWN` reply means this server is (now) a
  replica or not serving yet, whatever the name we connected to points at now. That reply
  and every command still waiting fail with `RedisConnectionError` and the connection is
  dropped; the next command connects again, resolving the host name again, so a DNS name
  (or a Service) moved to the promoted replica is followed. Only the error branch looks
  at this: the hot path is unchanged;
- TCP keepalive is on, so a peer that vanished without a FIN (a host gone, a NAT that
  forgot us) is noticed on an idle connection too;
- `rediss://` takes `ssl_ca_certs`, `ssl_certfile` and `ssl_keyfile` query parameters
  (absolute paths of PEM files): a private CA and a client certificate.

`RedisConnectionError` is the store's `StoreUnavailable`: the app answers it 503.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import socket
from collections.abc import Sequence
from typing import Any, cast

import hiredis

from gateway.store.base import StoreUnavailable
from gateway.store.redis.url import parse_url, tls_context

Arg = str | bytes | int | float


class RedisError(Exception):
    """An error reply (`-ERR ...`, `-NOSCRIPT ...`): this command failed, the connection is fine."""


class RedisConnectionError(StoreUnavailable, ConnectionError):
    """No connection, a lost one, a reply later than `socket_timeout`, or a failover reply
    that dropped the connection: the command may or may not have run."""


# Error replies of a server that cannot take this command now, on this connection: a
# replica (READONLY, after a failover demoted it), a server still loading its data
# (LOADING), a replica cut off from its primary (MASTERDOWN). None of them ran the command.
FAILOVER_REPLIES = ("READONLY ", "LOADING ", "MASTERDOWN ")
# TCP keepalive: first probe after 30 s idle, then every 10 s, dead after 3 missed.
KEEPALIVE = {"TCP_KEEPIDLE": 30, "TCP_KEEPINTVL": 10, "TCP_KEEPCNT": 3}


def _keepalive(sock: Any) -> None:
    """SO_KEEPALIVE with short probes where the platform has the knobs (Linux, macOS)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in KEEPALIVE.items():
        option = getattr(socket, name, None)
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


def pack(args: Sequence[Arg]) -> bytes:
    """One command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, bytes):
            b = a
        elif isinstance(a, str):
            b = a.encode()
        elif isinstance(a, int):
            b = b"%d" % a
        elif isinstance(a, float):
            b = repr(a).encode()
        else:
            raise TypeError(f"a Redis argument must be str, bytes, int or float, not {type(a).__name__}")
        out += (b"$%d\r\n" % len(b), b, b"\r\n")
    return b"".join(out)


class _Connection(asyncio.Protocol):
    """One TCP connection: an outbox flushed once per loop turn, and the futures of the
    commands sent, in order, each with the loop time it was queued at."""

    def __init__(self, timeout: float):
        self.loop = asyncio.get_running_loop()
        self.timeout = timeout
        self.reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None
        self.pending: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self.outbox: list[bytes] = []
        self.timer: asyncio.TimerHandle | None = None
        self.error: RedisConnectionError | None = None  # set once: the connection is dead
        self.writes = 0  # how many socket writes: lets tests see the pipelining

    # asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None:
            _keepalive(sock)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        try:
            while (reply := self.reader.gets()) is not False:
                if not self.pending:
                    raise hiredis.ProtocolError("a reply no command asked for")
                fut, queued = self.pending.popleft()
                if isinstance(reply, hiredis.ReplyError):
                    error = str(reply)
                    if error.startswith(FAILOVER_REPLIES):  # kill() fails it with the rest
                        self.pending.appendleft((fut, queued))
                        self.kill(
                            RedisConnectionError(
                                f"Redis cannot take commands on this connection ({error}); it is reopened"
                            )
                        )
                        return
                    if not fut.done():  # done: its caller was cancelled, the reply is only consumed
                        fut.set_exception(RedisError(error))
                elif not fut.done():
                    fut.set_result(reply)
        except hiredis.ProtocolError as exc:
            self.kill(RedisConnectionError(f"Redis protocol error: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.kill(RedisConnectionError(f"connection to Redis lost: {exc or 'closed by the server'}"))

    # commands --------------------------------------------------------------------------
    def send(self, command: bytes) -> asyncio.Future[Any]:
        if self.error is not None:
            raise self.error
        fut = self.loop.create_future()
        if not self.outbox:
            self.loop.call_soon(self.flush)
        self.outbox.append(command)
        self.pending.append((fut, self.loop.time()))
        if self.timer is None:
            self.timer = self.loop.call_at(self.loop.time() + self.timeout, self.check_timeout)
        return fut

    def flush(self) -> None:
        if self.outbox and self.transport is not None and self.error is None:
            self.transport.write(b"".join(self.outbox))
            self.writes += 1
        self.outbox.clear()

    def check_timeout(self) -> None:
        """One timer per connection, not per command: kill when the oldest waiting command
        is overdue, else wait until it would be."""
        self.timer = None
        if not self.pending or self.error is not None:
            return
        deadline = self.pending[0][1] + self.timeout
        if self.loop.time() >= deadline:
            self.kill(RedisConnectionError(f"no reply from Redis within {self.timeout:g} s"))
        else:
            self.timer = self.loop.call_at(deadline, self.check_timeout)

    def kill(self, error: RedisConnectionError) -> None:
        """Fail everything waiting and close: replies can no longer be matched to commands."""
        if self.error is None:
            self.error = error
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None:
            self.transport.abort()
        self.outbox.clear()
        while self.pending:
            fut, _ = self.pending.popleft()
            if not fut.done():
                fut.set_exception(self.error)


class Script:
    """A Lua script run by its SHA1 (EVALSHA), falling back to EVAL when Redis does not know
    it (after a restart or SCRIPT FLUSH): NOSCRIPT means it did not run, so this is safe."""

    def __init__(self, client: RedisClient, source: str):
        self.client = client
        self.source = source.encode()
        self.sha = hashlib.sha1(self.source).hexdigest()

    async def __call__(self, keys: Sequence[Arg] = (), args: Sequence[Arg] = ()) -> Any:
        try:
            return await self.client.execute("EVALSHA", self.sha, len(keys), *keys, *args)
        except RedisError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        return await self.client.execute("EVAL", self.source, len(keys), *keys, *args)


class RedisClient:
    def __init__(self, url: str, *, socket_timeout: float = 2.0, connect_timeout: float = 1.0):
        self.address = parse_url(url)
        self.tls = tls_context(self.address)
        self.socket_timeout = socket_timeout
        self.connect_timeout = connect_timeout
        self.scripts: list[Script] = []
        self._conn: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None

    async def execute(self, *args: Arg) -> Any:
        """Send one command (in the next write of this loop turn) and return its reply:
        bytes, int, None or a list of those. Raises RedisError, RedisConnectionError."""
        conn = self._conn
        if conn is None or conn.error is not None:
            conn = await self._connect()
        return await conn.send(pack(args))

    def register_script(self, source: str) -> Script:
        script = Script(self, source)
        self.scripts.append(script)
        return script

    async def load_scripts(self) -> None:
        """SCRIPT LOAD every registered script, so the first requests do not send sources."""
        for script in self.scripts:
            await self.execute("SCRIPT", "LOAD", script.source)

    async def ping(self) -> None:
        reply = await self.execute("PING")
        if reply != b"PONG":
            raise RedisError(f"unexpected PING reply {reply!r}")

    @property
    def writes(self) -> int:
        return self._conn.writes if self._conn is not None else 0

    async def aclose(self) -> None:
        """Close the connection; commands still waiting fail. A later command reconnects."""
        if self._connecting is not None:
            self._connecting.cancel()  # _open closes what it had opened
        if self._conn is not None:
            self._conn.kill(RedisConnectionError("the client was closed"))
            self._conn = None

    async def _connect(self) -> _Connection:
        """Concurrent callers share one attempt and its outcome: while Redis is down, N callers
        fail after one timeout, not one after another. A cancelled caller leaves it running."""
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
            self._connecting.add_done_callback(self._connected)
        attempt = self._connecting
        try:
            return await asyncio.shield(attempt)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if attempt.cancelled() and not (task and task.cancelling()):  # aclose(), not our caller
                raise RedisConnectionError("the client was closed") from None
            raise

    def _connected(self, attempt: asyncio.Future[_Connection]) -> None:
        if self._connecting is attempt:
            self._connecting = None
        if not attempt.cancelled() and attempt.exception() is None:
            self._conn = attempt.result()

    async def _open(self) -> _Connection:
        a = self.address
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self.socket_timeout), a.host, a.port, ssl=self.tls),
                self.connect_timeout,
            )
        except (TimeoutError, OSError) as exc:
            raise RedisConnectionError(f"cannot connect to Redis at {a.host}:{a.port}: {exc or 'timed out'}") from None
        try:
            if a.password is not None:
                auth = ("AUTH", a.username, a.password) if a.username else ("AUTH", a.password)
                await conn.send(pack(auth))
            if a.db:
                await conn.send(pack(("SELECT", a.db)))
        except RedisError as exc:
            conn.kill(RedisConnectionError(f"Redis refused the connection setup: {exc}"))
            raise conn.error from None  # type: ignore[misc]
        except BaseException:  # a timeout, or cancelled by aclose(): do not leak the socket
            conn.kill(RedisConnectionError("the connection setup did not finish"))
            raise
        return conn
