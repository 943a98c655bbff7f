"""`Http1Pool` (gateway/relays/http1.py) against real servers on 127.0.0.1 that write
hand-made HTTP bytes, so each test controls exactly what the client reads, when the
connection closes or resets, and what the server received.

Its errors decide a create's charge: `ConnectFailed` means nothing was sent (refund);
`ReplyTimeout` and `ReplyFailed` mean the request was (or may have been) sent without a
complete answer (outcome unknown). The tests check the exact class, not just "an error".
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import ssl
import struct
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import eventually, self_signed

from gateway.relays.http1 import USER_AGENT, ConnectFailed, Http1Pool, Reply, ReplyFailed, ReplyTimeout

TIMEOUT = 0.3  # where a reply timeout is the point
CONNECT_TIMEOUT = 0.2  # where a connect timeout is the point


# --- the server ----------------------------------------------------------------------------
@dataclass
class Request:
    raw: bytes  # exactly the bytes of the request: head and body
    line: str
    headers: dict[str, str]  # names lower-cased
    body: bytes


@dataclass
class Conn:
    """One accepted connection, as the handler sees it."""

    index: int  # 0 for the server's first accepted connection
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    server: Server
    eof: bool = False  # the client closed it (seen between requests or by `until_eof`)
    task: asyncio.Task[Any] | None = None  # the handler's

    async def request(self) -> Request:
        """Read one request (head, then Content-Length bytes of body) and record it."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            self.eof = not exc.partial  # closed by the client between requests
            raise
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if line)}
        body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        req = Request(head + body, lines[0], headers, body)
        self.server.requests.append(req)
        self.server.by_conn.setdefault(self.index, []).append(req)
        return req

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def until_eof(self) -> None:
        """Answer nothing more; return when the client closes the connection."""
        while await self.reader.read(65536):
            pass
        self.eof = True

    def reset(self) -> None:
        """Close with a TCP RST (SO_LINGER 0) instead of a FIN."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


Handler = Callable[[Conn], Awaitable[None]]


@dataclass
class Server:
    handler: Handler
    ssl_context: ssl.SSLContext | None = None
    conns: list[Conn] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    by_conn: dict[int, list[Request]] = field(default_factory=dict)
    port: int = 0
    server: asyncio.AbstractServer | None = None

    @property
    def accepted(self) -> int:
        return len(self.conns)

    def url(self, path: str = "") -> str:
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}{path}"

    async def start(self) -> Server:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl_context)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Stop listening, drop every connection, and wait for their handlers to end."""
        assert self.server is not None
        self.server.close()
        for conn in self.conns:
            conn.writer.transport.abort()
        await self.server.wait_closed()
        if self.handlers:
            await asyncio.wait(self.handlers, timeout=2)

    @property
    def handlers(self) -> list[asyncio.Task[Any]]:
        return [c.task for c in self.conns if c.task is not None and not c.task.done()]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(len(self.conns), reader, writer, self, task=asyncio.current_task())
        self.conns.append(conn)
        try:
            await self.handler(conn)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()


def reply(status: int = 200, body: bytes = b"", headers: tuple[tuple[str, str], ...] = (), reason: str = "X") -> bytes:
    """A reply with a Content-Length."""
    head = f"HTTP/1.1 {status} {reason}\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers)
    return (head + "\r\n").encode("latin-1") + body


async def answer_each(conn: Conn) -> None:
    """Keep-alive: answer every request on the connection, 200 with its request line."""
    while True:
        req = await conn.request()
        await conn.send(reply(200, req.line.encode(), (("X-Conn", str(conn.index)),)))


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[Server]]]:
    servers: list[Server] = []

    async def make(handler: Handler = answer_each, ssl_context: ssl.SSLContext | None = None) -> Server:
        servers.append(await Server(handler, ssl_context).start())
        return servers[-1]

    yield make
    for server in servers:
        await server.stop()


@pytest.fixture
def pool() -> Any:
    pools: list[Http1Pool] = []

    def make(
        base_url: str,
        *,
        max_connections: int = 4,
        keepalive: float = 5.0,
        max_reply_bytes: int = 1 << 20,
        ssl_context: ssl.SSLContext | None = None,
    ) -> Http1Pool:
        pools.append(
            Http1Pool(
                base_url,
                max_connections=max_connections,
                keepalive=keepalive,
                max_reply_bytes=max_reply_bytes,
                ssl_context=ssl_context,
            )
        )
        return pools[-1]

    yield make
    for p in pools:
        p.close()


async def get(
    p: Http1Pool, path: str = "/x", *, timeout: float = 2.0, connect_timeout: float = 1.0, method: str = "GET"
) -> Reply:
    return await p.request(method, path, [], None, timeout=timeout, connect_timeout=connect_timeout)


async def failure(p: Http1Pool, **kw: Any) -> tuple[Exception, float]:
    """The exception a request raised (it must raise one of the pool's errors) and how long it took."""
    start = time.monotonic()
    with pytest.raises((ConnectFailed, ReplyFailed)) as info:
        await get(p, **kw)
    return info.value, time.monotonic() - start


# --- keep-alive and reply framing ----------------------------------------------------------
async def test_keep_alive_sends_sequential_requests_over_one_connection(serve, pool) -> None:
    server = await serve()
    p = pool(server.url())
    replies = [await get(p, f"/tasks/{i}") for i in range(5)]
    assert [r.status for r in replies] == [200] * 5
    assert [r.body for r in replies] == [f"GET /tasks/{i} HTTP/1.1".encode() for i in range(5)]
    assert replies[0].headers == {"content-length": "21", "x-conn": "0"}  # names lower-cased
    assert server.accepted == 1 and p.connections_made == 1
    assert [r.line for r in server.by_conn[0]] == [f"GET /tasks/{i} HTTP/1.1" for i in range(5)]


async def test_chunked_body_is_assembled_and_the_connection_kept(serve, pool) -> None:
    async def chunked(conn: Conn) -> None:
        while True:
            await conn.request()
            await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n")
            for part in (b'{"task": ', b'{"id": "t-1"}', b"}"):
                await conn.send(b"%x\r\n%s\r\n" % (len(part), part))
                await asyncio.sleep(0.01)
            await conn.send(b"0\r\n\r\n")

    server = await serve(chunked)
    p = pool(server.url())
    first, second = await get(p), await get(p)
    assert first.status == 200 and first.body == b'{"task": {"id": "t-1"}}'
    assert first.headers["content-type"] == "application/json"
    assert second.body == first.body
    assert server.accepted == 1 and p.connections_made == 1


async def test_connection_close_header_makes_the_next_request_open_a_new_connection(serve, pool) -> None:
    async def says_close(conn: Conn) -> None:
        await conn.request()
        # says it closes, but leaves the connection open: only the header can stop a reuse
        await conn.send(reply(200, b"bye", (("Connection", "close"),)))
        await conn.until_eof()

    server = await serve(says_close)
    p = pool(server.url())
    assert (await get(p)).body == b"bye"
    assert (await get(p)).body == b"bye"
    assert server.accepted == 2 and p.connections_made == 2
    await eventually(lambda: server.conns[0].eof, within=2, message="the client closing the first connection")


@pytest.mark.parametrize("version", ["HTTP/1.0", "HTTP/1.1"])
async def test_body_without_length_is_read_until_the_close(serve, pool, version: str) -> None:
    async def until_close(conn: Conn) -> None:
        await conn.request()
        await conn.send(f"{version} 200 OK\r\nContent-Type: text/plain\r\n\r\nfirst part, ".encode())
        await asyncio.sleep(0.02)
        await conn.send(b"second part")
        # a clean close (FIN) ends the body

    server = await serve(until_close)
    p = pool(server.url())
    r = await get(p)
    assert (r.status, r.body) == (200, b"first part, second part")
    assert (await get(p)).body == b"first part, second part"
    assert server.accepted == 2 and p.connections_made == 2


async def test_no_content_reply_completes_without_a_body(serve, pool) -> None:
    async def no_content(conn: Conn) -> None:
        while True:
            await conn.request()
            await conn.send(b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n")

    server = await serve(no_content)
    p = pool(server.url())
    for _ in range(2):
        r = await get(p, timeout=1.0)
        assert (r.status, r.body, r.headers) == (204, b"", {"x-a": "1"})
    assert server.accepted == 1


async def test_interim_1xx_replies_are_skipped_for_the_final_one(serve, pool) -> None:
    """100 Continue and 103 Early Hints come before the real answer (RFC 9110 §15.2: a client
    must parse them). Taken as the answer, a create's 1xx reads as refused (refund, maybe
    re-sent elsewhere) while the relay goes on to create the task."""

    async def hints_first(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
        await asyncio.sleep(0.02)
        await conn.send(reply(202, b'{"task": {"id": "t-9"}}', (("X-Final", "yes"),)))
        await conn.request()
        await conn.send(reply(200, b"again"))

    server = await serve(hints_first)
    p = pool(server.url())
    r = await get(p, method="POST")
    assert (r.status, r.body) == (202, b'{"task": {"id": "t-9"}}')
    assert r.headers == {"content-length": "23", "x-final": "yes"}  # none of the interim replies' headers
    assert (await get(p)).body == b"again"
    assert server.accepted == 1


# --- sent, no complete reply: ReplyFailed, never ConnectFailed -----------------------------
async def _close(conn: Conn) -> None:
    await conn.request()


async def _reset(conn: Conn) -> None:
    await conn.request()
    conn.reset()


async def _half_headers(conn: Conn) -> None:
    await conn.request()
    await conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: appl")


async def _half_body(conn: Conn) -> None:
    await conn.request()
    await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 40)


async def _half_chunked(conn: Conn) -> None:
    await conn.request()
    await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")


async def _unlengthed_body_then_reset(conn: Conn) -> None:
    """A body ended by its close, but the close is a reset: the end is not known to be the end."""
    await conn.request()
    await conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + b'{"task": {"id"')
    await asyncio.sleep(0.02)
    conn.reset()


async def _interim_then_close(conn: Conn) -> None:
    await conn.request()
    await conn.send(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n")


async def _switching_protocols(conn: Conn) -> None:
    await conn.request()
    await conn.send(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    await conn.until_eof()


@pytest.mark.parametrize(
    "handler",
    [
        _close,
        _reset,
        _half_headers,
        _half_body,
        _half_chunked,
        _unlengthed_body_then_reset,
        _interim_then_close,
        _switching_protocols,
    ],
    ids=lambda h: h.__name__.strip("_"),
)
async def test_sent_without_a_complete_reply_is_reply_failed(serve, pool, handler: Handler) -> None:
    server = await serve(handler)
    p = pool(server.url())
    exc, took = await failure(p, timeout=5.0)
    assert type(exc) is ReplyFailed  # not ConnectFailed (it was sent), not a timeout (it closed)
    assert took < 2.0
    assert len(server.requests) == 1 and p.connections_made == 1


@pytest.mark.parametrize(
    "garbage",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(32)),
        b"HTTP/1.1 abc Nope\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc" + b"not http at all\r\n\r\n",
    ],
    ids=["ssh", "binary", "status", "two-lengths", "trailing-junk"],
)
async def test_garbage_reply_is_reply_failed_or_not_reused(serve, pool, garbage: bytes) -> None:
    async def junk(conn: Conn) -> None:
        await conn.request()
        await conn.send(garbage)
        await conn.until_eof()

    server = await serve(junk)
    p = pool(server.url())
    start = time.monotonic()
    try:
        r = await get(p, timeout=2.0)
    except ReplyFailed as exc:
        assert type(exc) is ReplyFailed
    else:  # the reply before the junk is a reply, but the connection is not trusted again
        assert garbage.startswith(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n") and r.body == b"abc"
    assert time.monotonic() - start < 1.5
    await eventually(lambda: server.conns[0].eof, within=2, message="the client closing the connection")
    assert p.connections_made == 1 and not p._idle


async def test_bytes_after_a_reply_make_the_connection_unusable(serve, pool) -> None:
    """A second reply in the same bytes as the first was never asked for: left in the
    parser it would be taken as (or swallow) the next request's answer."""

    async def two_replies(conn: Conn) -> None:
        if conn.index == 0:
            await conn.request()
            # a stray reply whose body would swallow the next real answer (29 bytes)
            stray = b"HTTP/1.1 202 Accepted\r\nX-Stray: 1\r\nContent-Length: 29\r\n\r\n"
            await conn.send(reply(200, b"first", (("X-First", "1"),)) + stray)
        while True:
            await conn.request()
            await conn.send(reply(500, b'{"error": "really a failure"}'))

    server = await serve(two_replies)
    p = pool(server.url())
    first = await get(p)
    assert (first.status, first.body, first.headers) == (200, b"first", {"content-length": "5", "x-first": "1"})
    second = await get(p)
    assert (second.status, second.body) == (500, b'{"error": "really a failure"}')
    assert server.accepted == 2 and p.connections_made == 2


# --- timeouts --------------------------------------------------------------------------------
@pytest.mark.parametrize("sends_headers", [False, True], ids=["silent", "headers-then-silent"])
async def test_no_reply_in_time_is_reply_timeout_and_the_connection_is_dropped(
    serve, pool, sends_headers: bool
) -> None:
    async def hangs_first(conn: Conn) -> None:
        if conn.index > 0:
            return await answer_each(conn)
        await conn.request()
        if sends_headers:
            await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await conn.until_eof()

    server = await serve(hangs_first)
    p = pool(server.url())
    exc, took = await failure(p, timeout=TIMEOUT)
    assert type(exc) is ReplyTimeout
    # loop.time() is time.monotonic(); 1 ms for float rounding of the deadline
    assert TIMEOUT - 0.001 <= took < TIMEOUT + 1.0
    await eventually(lambda: server.conns[0].eof, within=2, message="the client closing the timed-out connection")
    r = await get(p)
    assert r.status == 200 and r.headers["x-conn"] == "1"
    assert server.accepted == 2 and p.connections_made == 2


async def test_nothing_listening_is_connect_failed(pool) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = pool(f"http://127.0.0.1:{port}")
    exc, took = await failure(p)
    assert type(exc) is ConnectFailed and took < 1.0
    assert p.connections_made == 0


async def test_connect_timeout_is_connect_failed(pool) -> None:
    """A listener whose accept queue is full drops new SYNs (Linux): the connect hangs until
    the connect timeout. Nothing was sent."""
    loop = asyncio.get_running_loop()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        fillers: list[socket.socket] = []
        try:
            for _ in range(16):  # connect until one no longer completes: the queue is full
                filler = socket.socket()
                filler.setblocking(False)
                fillers.append(filler)
                try:
                    await asyncio.wait_for(loop.sock_connect(filler, listener.getsockname()), 0.1)
                except TimeoutError:
                    break
            else:
                pytest.fail("the accept queue never filled")
            p = pool(f"http://127.0.0.1:{listener.getsockname()[1]}")
            exc, took = await failure(p, timeout=2.0, connect_timeout=CONNECT_TIMEOUT)
        finally:
            for filler in fillers:
                filler.close()
    assert type(exc) is ConnectFailed and isinstance(exc.__cause__, TimeoutError)
    assert CONNECT_TIMEOUT - 0.001 <= took < CONNECT_TIMEOUT + 0.5
    assert p.connections_made == 0


# --- idle connections -------------------------------------------------------------------------
async def test_idle_connection_closed_by_the_server_is_not_reused(serve, pool) -> None:
    async def closes_after_one(conn: Conn) -> None:
        req = await conn.request()
        await conn.send(reply(200, req.line.encode(), (("X-Conn", str(conn.index)),)))
        # then closes (FIN) with no Connection: close, as a server does at its idle limit

    server = await serve(closes_after_one)
    p = pool(server.url())
    assert (await get(p)).headers["x-conn"] == "0"
    assert len(p._idle) == 1
    await eventually(lambda: p._idle[0].closed, within=2, message="the client seeing the idle connection close")
    r = await get(p)
    assert r.status == 200 and r.headers["x-conn"] == "1"
    assert server.accepted == 2 and p.connections_made == 2


async def test_idle_connection_older_than_keepalive_is_not_reused(serve, pool) -> None:
    server = await serve()
    p = pool(server.url(), keepalive=0.05)
    assert (await get(p)).headers["x-conn"] == "0"
    idle_since = p._idle[0].idle_since
    loop = asyncio.get_running_loop()
    await eventually(lambda: loop.time() - idle_since > 0.06, within=2, message="the keepalive passing")
    assert (await get(p)).headers["x-conn"] == "1"
    assert server.accepted == 2 and p.connections_made == 2
    await eventually(lambda: server.conns[0].eof, within=2, message="the client closing the expired connection")


# --- bodies: encodings and the size limit -------------------------------------------------------
@pytest.mark.parametrize("encoding", ["gzip", "deflate", "x-gzip"])
async def test_compressed_body_is_decoded(serve, pool, encoding: str) -> None:
    plain = b'{"task": {"id": "t-1", "status": "RUNNING"}}' * 20
    packed = zlib.compress(plain) if encoding == "deflate" else gzip.compress(plain)

    async def compressed(conn: Conn) -> None:
        await conn.request()
        await conn.send(reply(200, packed, (("Content-Encoding", encoding.upper()),)))

    server = await serve(compressed)
    r = await get(pool(server.url()))
    assert len(packed) < len(plain) and r.body == plain


async def test_undecodable_compressed_body_is_reply_failed(serve, pool) -> None:
    async def bad_gzip(conn: Conn) -> None:
        await conn.request()
        await conn.send(reply(200, b"this is not gzip", (("Content-Encoding", "gzip"),)))

    server = await serve(bad_gzip)
    exc, _ = await failure(pool(server.url()))
    assert type(exc) is ReplyFailed


@pytest.mark.parametrize("writes", [1, 7], ids=["one-write", "several-writes"])
async def test_body_over_max_reply_bytes_is_cut_and_the_connection_dropped(serve, pool, writes: int) -> None:
    body = bytes(range(256)) * 4  # 1024 bytes

    async def big(conn: Conn) -> None:
        while True:
            await conn.request()
            await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1024\r\n\r\n")
            step = -(-len(body) // writes)
            for i in range(0, len(body), step):
                await conn.send(body[i : i + step])
                if writes > 1:
                    await asyncio.sleep(0.005)

    server = await serve(big)
    p = pool(server.url(), max_reply_bytes=100)
    r = await get(p)
    assert r.status == 200 and r.body == body[:100]
    assert (await get(p)).body == body[:100]
    assert server.accepted == 2 and p.connections_made == 2


async def test_body_of_exactly_max_reply_bytes_is_whole_and_the_connection_kept(serve, pool) -> None:
    async def exact(conn: Conn) -> None:
        while True:
            await conn.request()
            await conn.send(reply(200, b"y" * 100))

    server = await serve(exact)
    p = pool(server.url(), max_reply_bytes=100)
    assert (await get(p)).body == b"y" * 100
    assert (await get(p)).body == b"y" * 100
    assert server.accepted == 1


async def test_decoded_body_is_cut_to_max_reply_bytes(serve, pool) -> None:
    plain = b"z" * 10_000

    async def bomb(conn: Conn) -> None:
        await conn.request()
        await conn.send(reply(200, gzip.compress(plain), (("Content-Encoding", "gzip"),)))

    server = await serve(bomb)
    r = await get(pool(server.url(), max_reply_bytes=500))
    assert r.body == plain[:500]


# --- TLS ----------------------------------------------------------------------------------------
def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


async def test_tls_with_a_trusted_certificate(serve, pool, tmp_path: Path) -> None:
    cert_file, key_file = self_signed(tmp_path, ["localhost"], ["127.0.0.1"])
    server = await serve(answer_each, server_context(cert_file, key_file))
    p = pool(server.url("/v1"), ssl_context=ssl.create_default_context(cafile=str(cert_file)))
    first, second = await get(p, "/tasks"), await get(p, "/tasks")
    assert (first.status, first.body) == (200, b"GET /v1/tasks HTTP/1.1")
    assert second.body == first.body
    assert server.accepted == 1 and p.connections_made == 1


async def test_tls_body_ended_by_the_close_is_read_whole(serve, pool, tmp_path: Path) -> None:
    """Over TLS the close comes as close_notify and a FIN: still a clean end of the body."""
    cert_file, key_file = self_signed(tmp_path, ["localhost"], ["127.0.0.1"])

    async def until_close(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\n\r\nclose-delimited")

    server = await serve(until_close, server_context(cert_file, key_file))
    p = pool(server.url(), ssl_context=ssl.create_default_context(cafile=str(cert_file)))
    assert (await get(p)).body == b"close-delimited"


@pytest.mark.parametrize("case", ["untrusted", "wrong-name"])
async def test_tls_that_does_not_verify_is_connect_failed(serve, pool, tmp_path: Path, case: str) -> None:
    names = (["localhost"], ["127.0.0.1"]) if case == "untrusted" else (["relay.example"], [])
    cert_file, key_file = self_signed(tmp_path, *names)
    server = await serve(answer_each, server_context(cert_file, key_file))
    trusted = None if case == "untrusted" else ssl.create_default_context(cafile=str(cert_file))
    p = pool(server.url(), ssl_context=trusted)
    exc, took = await failure(p)
    assert type(exc) is ConnectFailed and took < 1.0
    assert server.requests == [] and p.connections_made == 0


# --- the request's bytes ----------------------------------------------------------------------
async def test_request_bytes_are_exact(serve, pool) -> None:
    server = await serve()
    p = pool(server.url("/api/"))
    headers = [("Authorization", "Bearer sk-1"), ("X-Request-Id", "rid-1"), ("Content-Type", "application/json")]
    body = b'{"prompt": "a cat", "seed": 7}'
    r = await p.request("POST", "/runway/tasks", headers, body, timeout=2.0, connect_timeout=1.0)
    assert r.body == b"POST /api/runway/tasks HTTP/1.1"
    assert server.requests[0].raw == (
        b"POST /api/runway/tasks HTTP/1.1\r\n"
        + f"Host: 127.0.0.1:{server.port}\r\n".encode()
        + f"User-Agent: {USER_AGENT}\r\n".encode()
        + b"Authorization: Bearer sk-1\r\nX-Request-Id: rid-1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    # a GET has no body and no Content-Length
    await p.request("GET", "/runway/tasks/t-1", [("Accept", "application/json")], None, timeout=2, connect_timeout=1)
    assert server.requests[1].raw == (
        b"GET /api/runway/tasks/t-1 HTTP/1.1\r\n"
        + f"Host: 127.0.0.1:{server.port}\r\nUser-Agent: {USER_AGENT}\r\n".encode()
        + b"Accept: application/json\r\n\r\n"
    )
    assert server.accepted == 1


@pytest.mark.parametrize(
    "path,target",
    [
        ("/tasks/a b", "/api/tasks/a%20b"),
        ("/tasks/é", "/api/tasks/%C3%A9"),
        ("/tasks/t-1?x=1&y=a:b", "/api/tasks/t-1?x=1&y=a:b"),
        ("/tasks/a%2Fb", "/api/tasks/a%2Fb"),  # already encoded: kept
        ('/tasks/<id>"', "/api/tasks/%3Cid%3E%22"),
    ],
)
async def test_request_target_is_percent_encoded(serve, pool, path: str, target: str) -> None:
    server = await serve()
    r = await get(pool(server.url("/api")), path)
    assert server.requests[0].line == f"GET {target} HTTP/1.1"
    assert r.body == f"GET {target} HTTP/1.1".encode()


@pytest.mark.parametrize(
    "base,host",
    [
        ("http://relay.example/v1", "relay.example"),
        ("http://relay.example:80/v1", "relay.example"),
        ("https://relay.example:443", "relay.example"),
        ("https://relay.example:8443", "relay.example:8443"),
        ("http://relay.example:443", "relay.example:443"),
        ("http://[::1]:8080/", "[::1]:8080"),
        ("https://[::1]/", "[::1]"),
    ],
)
def test_host_header_has_the_port_only_when_not_the_default(pool, base: str, host: str) -> None:
    """(Without a server: a default port cannot be listened on here.)"""
    raw = pool(base)._request("GET", "/t", [], None)
    assert raw.split(b"\r\n")[1] == f"Host: {host}".encode()


@pytest.mark.parametrize("value", ["v\r\nX-Evil: 1", "v\nX-Evil: 1", "v\rX-Evil: 1"])
async def test_header_with_a_line_break_is_refused_before_sending(serve, pool, value: str) -> None:
    server = await serve()
    p = pool(server.url())
    with pytest.raises(ValueError):
        await p.request("POST", "/t", [("X-Request-Id", value)], b"{}", timeout=2, connect_timeout=1)
    assert server.accepted == 0 and p.connections_made == 0
    # with a kept-alive connection open, still nothing is written into it
    await get(p)
    with pytest.raises(ValueError):
        await p.request("POST", "/t", [("X-Request-Id", value)], b"{}", timeout=2, connect_timeout=1)
    await get(p)
    assert [r.line for r in server.requests] == ["GET /x HTTP/1.1"] * 2
    assert server.accepted == 1 and not any(b"Evil" in r.raw for r in server.requests)


async def test_non_http_base_url_fails_every_request_as_not_sent() -> None:
    """A pool is built whatever its URL (a relay client exists before its config is checked,
    and must start); a URL that is not http(s) fails each request as never sent."""
    for base in ("ftp://relay.example", "relay.example", "http://", ""):
        p = Http1Pool(base, max_connections=1, keepalive=1, max_reply_bytes=1)
        with pytest.raises(ConnectFailed, match="not an http"):
            await get(p)
        assert p.connections_made == 0


# --- the connection limit ------------------------------------------------------------------------
async def test_one_connection_serves_concurrent_requests_in_turn(serve, pool) -> None:
    in_flight: list[int] = []

    async def slow(conn: Conn) -> None:
        while True:
            req = await conn.request()
            in_flight.append(len(conn.server.requests))
            await asyncio.sleep(0.05)
            await conn.send(reply(200, req.line.encode()))

    server = await serve(slow)
    p = pool(server.url(), max_connections=1)
    a, b = await asyncio.gather(get(p, "/a"), get(p, "/b"))
    assert (a.status, a.body) == (200, b"GET /a HTTP/1.1")
    assert (b.status, b.body) == (200, b"GET /b HTTP/1.1")
    assert server.accepted == 1 and p.connections_made == 1
    assert [r.line for r in server.by_conn[0]] == ["GET /a HTTP/1.1", "GET /b HTTP/1.1"]
    assert in_flight == [1, 2]  # the second was received after the first was answered


async def test_no_free_connection_in_time_is_connect_failed(serve, pool) -> None:
    async def hangs(conn: Conn) -> None:
        await conn.request()
        await conn.until_eof()

    server = await serve(hangs)
    p = pool(server.url(), max_connections=1)
    first = asyncio.create_task(get(p, "/first", timeout=0.8))
    await eventually(lambda: server.requests, within=2, message="the first request arriving")
    exc, took = await failure(p, timeout=2.0, connect_timeout=CONNECT_TIMEOUT)
    assert type(exc) is ConnectFailed  # nothing of it was sent
    assert CONNECT_TIMEOUT - 0.001 <= took < CONNECT_TIMEOUT + 0.5
    assert server.accepted == 1 and [r.line for r in server.requests] == ["GET /first HTTP/1.1"]
    with pytest.raises(ReplyTimeout):
        await first
    assert p.connections_made == 1


# --- redirects ----------------------------------------------------------------------------------
@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_redirect_is_returned_never_followed(serve, pool, status: int) -> None:
    elsewhere = await serve()

    async def redirects(conn: Conn) -> None:
        while True:
            await conn.request()
            await conn.send(reply(status, b"", (("Location", elsewhere.url("/runway/tasks")),)))

    server = await serve(redirects)
    p = pool(server.url())
    r = await p.request("POST", "/runway/tasks", [], b"{}", timeout=2, connect_timeout=1)
    assert r.status == status and r.headers["location"] == elsewhere.url("/runway/tasks")
    assert len(server.requests) == 1 and elsewhere.accepted == 0
    assert (await get(p)).status == status  # the connection is kept: a redirect is an ordinary reply
    assert server.accepted == 1 and elsewhere.accepted == 0
