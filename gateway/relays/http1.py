"""A lean HTTP/1.1 client for a relay's own API: its creates and its status calls.

Why not aiohttp for these two: its request machinery (a ClientRequest and ClientResponse
per call, the payload registry, timer contexts, a stream reader) was ~190 µs of CPU per
create on the bench machine, about a fifth of a create's whole cost, for two fixed requests
with small JSON bodies (docs/benchmarks.md, "Round 3"). This client does only what they
need, the way the Redis store's client does (`gateway/store/redis/client.py`):

- keep-alive connections to one relay, the most recently used first; one idle longer than
  `keepalive` (below common servers' own idle limit) or that the server said it closes is
  dropped, so a create is rarely written into a connection the relay is closing;
- replies parsed by httptools (C: uvicorn's own parser), fixed-length, chunked or ended by
  the close; gzip and deflate bodies decoded; at most `max_reply_bytes` kept;
- no redirects (a redirect is the relay's answer: `RelayClient` reads it as no task), no
  cookies, no proxies (the aiohttp session never read them from the environment either);
- its errors say whether the request left the machine, which decides a create's charge:
  `ConnectFailed` (nothing was sent: refund), `ReplyTimeout` and `ReplyFailed` (sent, or
  maybe sent, without a complete answer: the outcome is unknown).

Artifact downloads (streamed, SSRF-checked, redirects followed by hand) stay on aiohttp.
"""

from __future__ import annotations

import asyncio
import ssl
import zlib
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import httptools

USER_AGENT = "runway-gateway"
# the characters a request target keeps as they are (RFC 3986 pchar, "/" and "?"); any
# other is percent-encoded, as yarl did for aiohttp
TARGET_SAFE = "/?:@!$&'()*+,;=-._~%"


class ConnectFailed(Exception):
    """No connection (refused, unreachable, DNS, TLS, the connect timeout, no free
    connection in time): the request was never sent."""


class ReplyFailed(Exception):
    """The request was written (or may have been) but no complete, readable reply came:
    the connection closed, or the reply was not HTTP."""


class ReplyTimeout(ReplyFailed):
    """The request was written; the reply did not complete within the timeout."""


@dataclass
class Reply:
    status: int
    body: bytes
    headers: dict[str, str]  # names lower-cased; a repeated header keeps its last value


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection, one request at a time on it."""

    def __init__(self, max_reply_bytes: int):
        self.max_reply_bytes = max_reply_bytes
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[Reply] | None = None
        self.closed = False
        self.idle_since = 0.0
        self._new_reply()

    def _new_reply(self) -> None:
        self.headers: dict[str, str] = {}
        self.chunks: list[bytes] = []
        self.size = 0
        self.headers_done = False
        self.reusable = True

    # asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        if self.waiter is None or self.waiter.done():
            self.close()  # bytes nobody asked for: this connection cannot be trusted
            return
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:  # Upgrade: a 101 nobody asked for
            self._fail(ReplyFailed(f"unreadable reply: {exc}"))

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost settles a waiting request

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        unframed = "content-length" not in self.headers and "transfer-encoding" not in self.headers
        if exc is None and self.headers_done and unframed:  # a reset may have cut the body: no end
            self.reusable = False
            self.on_message_complete()  # a body that ends with the connection (HTTP/1.0 style)
        else:
            waiter.set_exception(ReplyFailed("the connection closed without a complete reply"))

    # httptools callbacks --------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.waiter is None or self.waiter.done():
            # a reply after the reply, in the same bytes: nobody asked for it, and left in the
            # parser it would be read as (part of) the next request's; stop, drop the connection
            raise ReplyFailed("bytes after the reply")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        room = self.max_reply_bytes - self.size
        self.size += len(body)
        if room > 0:
            self.chunks.append(body[:room] if len(body) > room else body)
        if self.size > self.max_reply_bytes:
            self.reusable = False  # keep the first max_reply_bytes, drop the connection

    def on_message_complete(self) -> None:
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        if 100 <= self.parser.get_status_code() < 200:
            # an interim reply (100 Continue, 103 Early Hints: RFC 9110 15.2, a client must
            # read them), not the answer: taken as one, a create would read as refused while
            # the relay goes on to make the task; the final reply follows on this connection
            self._new_reply()
            return
        try:
            body = _decoded(b"".join(self.chunks), self.headers.get("content-encoding"), self.max_reply_bytes)
        except zlib.error as exc:
            self._fail(ReplyFailed(f"undecodable body: {exc}"))
            return
        if self.size > self.max_reply_bytes or not self.parser.should_keep_alive():
            self.reusable = False
        waiter.set_result(Reply(self.parser.get_status_code(), body, self.headers))

    # the request ------------------------------------------------------------------------
    async def exchange(self, request: bytes, deadline: float) -> Reply:
        """Write one request and wait for its reply until `deadline` (loop time). A
        connection already lost is refused before the write: the request did not leave."""
        if self.closed or self.transport is None or self.transport.is_closing():
            raise ConnectFailed("the connection closed before the request was written")
        loop = asyncio.get_running_loop()
        self.waiter = waiter = loop.create_future()
        timer = loop.call_at(deadline, self._timed_out)
        try:
            self.transport.write(request)
            reply: Reply = await waiter
            return reply
        finally:
            timer.cancel()
            self.waiter = None
            self._new_reply_after(waiter)

    def _new_reply_after(self, waiter: asyncio.Future[Reply]) -> None:
        reusable = waiter.done() and not waiter.cancelled() and waiter.exception() is None and self.reusable
        if reusable:
            self._new_reply()
        else:
            self.close()

    def _timed_out(self) -> None:
        self._fail(ReplyTimeout("no complete reply in time"))

    def _fail(self, error: ReplyFailed) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(error)
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _decoded(body: bytes, encoding: str | None, limit: int) -> bytes:
    """A gzip or deflate body decoded (at most `limit` bytes of it); any other as it is."""
    if encoding is None or not body:
        return body
    encoding = encoding.strip().lower()
    if encoding in ("gzip", "x-gzip", "deflate"):
        return zlib.decompressobj(47).decompress(body, limit)  # 47: a zlib or gzip header
    return body


class Http1Pool:
    """Keep-alive HTTP/1.1 connections to one base URL (scheme, host, port, path prefix)."""

    def __init__(
        self,
        base_url: str,
        *,
        max_connections: int,
        keepalive: float,
        max_reply_bytes: int,
        ssl_context: ssl.SSLContext | None = None,
    ):
        parts = urlsplit(base_url)
        # a URL that is not http(s) fails each request as never sent, as a relay that cannot
        # be reached would (the config check refuses it; a client built without one, too)
        self.unusable = parts.scheme not in ("http", "https") or not parts.hostname
        self.base_url = base_url
        self.tls = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.tls else 80)
        self.prefix = parts.path.rstrip("/")
        default_port = parts.port is None or parts.port == (443 if self.tls else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        authority = host if default_port else f"{host}:{self.port}"
        self._head = f"Host: {authority}\r\nUser-Agent: {USER_AGENT}\r\n".encode("latin-1")
        self.keepalive = keepalive
        self.max_reply_bytes = max_reply_bytes
        self._ssl = ssl_context
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[_Connection] = []  # oldest first; the newest is taken first
        self.connections_made = 0  # how many connections this pool opened (tests read it)
        self._closed = False

    async def request(
        self,
        method: str,
        path: str,
        headers: list[tuple[str, str]],
        body: bytes | None,
        *,
        timeout: float,
        connect_timeout: float,
    ) -> Reply:
        """One request; its reply, whatever its status. Raises ConnectFailed (not sent),
        ReplyTimeout or ReplyFailed (sent, no complete reply)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        request = self._request(method, path, headers, body)
        if self._slots.locked():  # every connection busy: wait for one, within connect time
            try:
                await asyncio.wait_for(self._slots.acquire(), min(connect_timeout, timeout))
            except TimeoutError:
                raise ConnectFailed("no free connection to the relay in time") from None
        else:
            await self._slots.acquire()
        try:
            conn = self._take_idle(loop.time()) or await self._connect(min(connect_timeout, timeout))
            reply = await conn.exchange(request, deadline)
            if not conn.closed and not self._closed:
                conn.idle_since = loop.time()
                self._idle.append(conn)
            return reply
        finally:
            self._slots.release()

    def _request(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes | None) -> bytes:
        """The request's bytes: its line, Host and User-Agent, `headers`, the body's length."""
        lines = [f"{method} {quote(self.prefix + path, safe=TARGET_SAFE)} HTTP/1.1\r\n"]
        for name, value in headers:
            if "\r" in value or "\n" in value:
                raise ValueError(f"the {name} header may not hold a line break")
            lines.append(f"{name}: {value}\r\n")
        if body is not None:
            lines.append(f"Content-Length: {len(body)}\r\n")
        lines.append("\r\n")
        head = lines[0].encode("latin-1") + self._head + "".join(lines[1:]).encode("latin-1")
        return head + body if body else head

    def _take_idle(self, now: float) -> _Connection | None:
        idle = self._idle
        while idle and (idle[0].closed or now - idle[0].idle_since > self.keepalive):
            idle.pop(0).close()  # the oldest first: they expire first
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def _connect(self, timeout: float) -> _Connection:
        if self.unusable:
            raise ConnectFailed(f"not an http(s) URL: {self.base_url!r}")
        loop = asyncio.get_running_loop()
        if self.tls and self._ssl is None:
            self._ssl = ssl.create_default_context()
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self.max_reply_bytes),
                    self.host,
                    self.port,
                    ssl=self._ssl if self.tls else None,
                    server_hostname=self.host if self.tls else None,
                )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise ConnectFailed(f"could not connect: {type(exc).__name__}") from exc
        self.connections_made += 1
        return conn

    def close(self) -> None:
        """Close the idle connections; those in use close when their request ends."""
        self._closed = True
        for conn in self._idle:
            conn.close()
        self._idle.clear()
