"""One relay's client: pooled, timed out, behind its own circuit breaker.

Creates and status calls go through `http1.Http1Pool`, a lean keep-alive HTTP/1.1 client
(a fraction of aiohttp's CPU per request: docs/benchmarks.md, "Round 3") whose errors say
precisely whether a request left the machine, which decides whether a charge is refunded
(`Outcome.NOT_SENT`, `REJECTED`) or kept until settled (`UNKNOWN`). Artifact downloads are
streamed through an aiohttp session (not httpx: its default transport costs several times
aiohttp's CPU per proxied request, docs/benchmarks.md, the floors).

Artifact URLs come from the upstream's task objects, so they are fetched under the same
SSRF rules as tenant webhooks (`gateway.ssrf`), with `artifact_hosts` as the allow-list:
every hop is resolved and checked, the request goes to the checked address (the name in
`Host` and in TLS's SNI and certificate check), and redirects are followed by hand, each
new URL checked again, at most `MAX_ARTIFACT_REDIRECTS` of them. Artifact hosts are CDNs,
not the relay: their failures never touch the relay's circuit (issue 25, item 1), so a
broken artifact host cannot stop creates or status calls from reaching a healthy relay.

Two upstream answers are the operator's problem more than the tenant's: a 429 (the relay
key is rate limited: the tenant gets 503 `upstream_rate_limited` with a `retry-after`, and
the relay cools for that long) and a 401/403 (the relay refuses the key itself:
`KeyHealth` logs it at error level, counts it and `/readyz` shows it).
"""

from __future__ import annotations

import asyncio
import email.utils
import enum
import itertools
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
import orjson

from gateway.config import DEFAULT_RELAY_ID, UpstreamConfig
from gateway.errors import GatewayError
from gateway.logs import log_fields
from gateway.metrics import Metrics
from gateway.relays.circuit import CIRCUIT_FAILURES, CIRCUIT_OPEN_SECONDS, CircuitBreaker, Cooling, KeyHealth
from gateway.relays.http1 import ConnectFailed, Http1Pool, Reply, ReplyFailed, ReplyTimeout
from gateway.ssrf import HookPolicy, HookRefused, ResolvedHook, ResolveFailed, Resolver, resolve_hook

logger = logging.getLogger("gateway.upstream")
MAX_REPLY_BYTES = 2 * 1024 * 1024
KEEPALIVE_SECONDS = 4.0
MAX_CONNECTIONS = 256  # to one relay, from one process
CONNECT_SECONDS = 5.0  # at most, and at most the relay's timeout
MAX_ARTIFACT_REDIRECTS = 5
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
ARTIFACT_CONNECT_SECONDS = 5.0  # DNS, then connect: each bounded by this
KEY_REFUSED_STATUSES = (401, 403)
DEFAULT_RETRY_AFTER_SECONDS = 5  # an upstream 429 that did not say when
MAX_RETRY_AFTER_SECONDS = 3600
LAST_ERROR_MAX = 200

__all__ = ["CIRCUIT_FAILURES", "CIRCUIT_OPEN_SECONDS", "CircuitBreaker", "KeyHealth", "RelayClient"]


class Outcome(enum.Enum):
    NOT_SENT = "not_sent"  # the upstream never got the request: refund
    REJECTED = "rejected"  # the upstream answered an error: it created nothing, refund
    UNKNOWN = "unknown"  # sent, no usable answer: keep the charge until settled


class UpstreamFailure(GatewayError):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        outcome: Outcome,
        upstream_status: int | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(status, code, message, "api_error", headers=headers or {})
        self.outcome = outcome
        self.upstream_status = upstream_status


class RelayClient:
    """The client of one relay, and what this process knows of its health: the circuit,
    429 cooling, its keys, its last error and how many creates left it for another."""

    def __init__(
        self,
        config: UpstreamConfig,
        metrics: Metrics,
        resolver: Resolver | None = None,
        relay_id: str = DEFAULT_RELAY_ID,
        cooldown_seconds: float = CIRCUIT_OPEN_SECONDS,
    ):
        self.id = relay_id
        self.metrics = metrics
        self.circuit = CircuitBreaker(CIRCUIT_FAILURES, cooldown_seconds)
        self.cooling = Cooling()
        self._resolver = resolver  # None: the system's; tests inject one
        self.keys = KeyHealth()
        self.last_error: str | None = None
        self.failovers = 0
        # several relays: a 5xx answer to a create counts as a failure (contract §14);
        # the one relay of old keeps its circuit for connection failures and timeouts only
        self.answers_count = False
        self._turn = itertools.count()
        self._session: aiohttp.ClientSession | None = None  # artifact downloads
        self._http: Http1Pool | None = None  # creates and status calls
        self.reconfigure(config)

    @property
    def host(self) -> str:
        return urlsplit(self.config.base_url).hostname or ""

    # where it stands among the relays (a plain UpstreamConfig: the one relay of old)
    @property
    def priority(self) -> int:
        return int(getattr(self.config, "priority", 0))

    @property
    def weight(self) -> int:
        return int(getattr(self.config, "weight", 1))

    @property
    def enabled(self) -> bool:
        return bool(getattr(self.config, "enabled", True))

    @property
    def state(self) -> str:
        """closed | open | half_open | cooling (after a 429, while its circuit is closed)."""
        state = self.circuit.state
        return "cooling" if state == "closed" and self.cooling.active else state

    @property
    def available(self) -> bool:
        """Whether a new task may be sent here now: circuit closed (or its probe free), not cooling."""
        return self.circuit.ready and not self.cooling.active

    def seconds_until_ready(self) -> float:
        now = self.circuit.clock()
        opens = self.circuit.opens_until
        waits = [self.cooling.until - now, (opens - now) if opens is not None else 0.0]
        return max(0.0, *waits)

    def pick_key(self) -> int:
        """A new task's key: the next in turn; with several relays, the next the relay has
        not refused when there is one (the one relay of old keeps its plain turn)."""
        first = self.next_key_index()
        return self.key_order(first)[0] if self.answers_count else first

    def key_order(self, first: int) -> list[int]:
        """Every key index, starting at `first`, the keys the relay accepts before those it
        refused last (a refused key is still tried last: it may have been fixed)."""
        n = len(self.config.api_keys)
        turn = [(first + i) % n for i in range(n)]
        return [k for k in turn if k not in self.keys.failing] + [k for k in turn if k in self.keys.failing]

    def view(self, now: float) -> dict[str, Any]:
        """The relay as GET /admin/v1/relays shows it (never a key); `now` is UNIX time."""
        state = self.state
        until: float | None = None
        if state == "open":
            opens = self.circuit.opens_until
            until = None if opens is None else now + max(0.0, opens - self.circuit.clock())
        elif state == "cooling":
            until = now + max(0.0, self.cooling.until - self.cooling.clock())
        return {
            "object": "relay",
            "id": self.id,
            "host": self.host,
            "priority": self.priority,
            "weight": self.weight,
            "enabled": self.enabled,
            "state": state,
            "until": None if until is None else math.ceil(until),
            "keys": {"total": len(self.config.api_keys), "refused": len(self.keys.failing)},
            "last_error": self.last_error,
            "failovers": self.failovers,
        }

    def reconfigure(self, config: UpstreamConfig, cooldown_seconds: float | None = None) -> None:
        """Take (re)loaded settings: keys, URLs, the artifact allow-list, the timeout. The
        pooled session stays; a request uses the timeout current when it starts."""
        self.config = config
        if cooldown_seconds is not None:
            self.circuit.open_seconds = cooldown_seconds
        self.artifact_policy = HookPolicy.from_hosts(config.artifact_hosts, setting="artifact_hosts")
        if self._http is not None and self._http.base_url != config.base_url:
            self._http.close()
            self._http = self._new_pool()

    async def start(self) -> None:
        self.open()

    def open(self) -> None:
        """The pooled connections (in the running event loop)."""
        # An idle pooled connection is dropped before common servers drop it (uvicorn: 5 s):
        # a create sent on a connection the relay is closing fails with an unknown outcome.
        connector = aiohttp.TCPConnector(limit=MAX_CONNECTIONS, keepalive_timeout=KEEPALIVE_SECONDS, ttl_dns_cache=60)
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=True)
        self._http = self._new_pool()

    def _new_pool(self) -> Http1Pool:
        return Http1Pool(
            self.config.base_url,
            max_connections=MAX_CONNECTIONS,
            keepalive=KEEPALIVE_SECONDS,
            max_reply_bytes=MAX_REPLY_BYTES,
        )

    async def close(self) -> None:
        if self._http is not None:
            self._http.close()
        if self._session is not None:
            await self._session.close()

    def next_key_index(self) -> int:
        """New tasks take the configured keys in turn (however many a reload left)."""
        return next(self._turn) % len(self.config.api_keys)

    async def create(self, body: dict[str, Any], key_index: int, request_id: str) -> dict[str, Any]:
        """POST /runway/tasks; returns the task object or raises UpstreamFailure. The answer
        is the circuit's verdict: a task closes it; a 5xx (with several relays) or a 401/403
        of the relay's every key is a failure (the caller's `refused_keys`); a 429 cools
        the relay; another 4xx judged the request, not the relay."""
        sent = self.circuit.clock()
        reply = await self._call("create", "POST", "/runway/tasks", key_index, request_id, orjson.dumps(body), sent)
        try:
            task = self._task_or_fail(reply, "create")
        except UpstreamFailure as failure:
            self.last_error = _short(failure.message)
            if reply.status == 429:
                self.circuit.success(sent)  # alive, rate limiting: it cools instead
                self.cooling.start(retry_after_seconds(reply.headers.get("retry-after"), time.time()))
            elif self.answers_count and (reply.status >= 500 or failure.outcome is Outcome.UNKNOWN):
                self.circuit.failure(sent)
            elif self.answers_count and reply.status in KEY_REFUSED_STATUSES:
                self.circuit.release(sent)  # one key: the caller tries the others, then judges the relay
            else:
                self.circuit.success(sent)
            raise
        self.circuit.success(sent)
        return task

    def refused_keys(self, sent_at: float) -> None:
        """Every key of the relay was refused on one create (the first sent at `sent_at`,
        the circuit's clock): a failure of the relay."""
        self.circuit.failure(sent_at)

    async def status(self, task_id: str, key_index: int, request_id: str) -> dict[str, Any] | None:
        """The upstream's view of one task; None when it does not know the id (404)."""
        path = self.config.status_path.replace("{id}", task_id)
        sent = self.circuit.clock()
        reply = await self._call("status", "GET", path, key_index, request_id, None, sent)
        if self._guards("status"):
            self.circuit.success(sent)
        if reply.status == 404:
            return None
        return self._task_or_fail(reply, "status")

    async def stream(self, url: str, request_id: str) -> tuple[aiohttp.ClientResponse, AsyncIterator[bytes]]:
        """Open an artifact URL for streaming (no upstream key: artifact URLs are signed CDN
        links), following redirects under the SSRF rules. Returns the first non-redirect
        answer; raises UpstreamFailure (502 for a URL the rules refuse)."""
        start = time.perf_counter()
        target = await self._artifact_target(url, request_id, start)
        for hop in range(MAX_ARTIFACT_REDIRECTS + 1):
            resp = await self._get_artifact(target, request_id, start)
            location = resp.headers.get("location")
            if resp.status not in REDIRECT_STATUSES or not location:
                self._count("artifact", start, str(resp.status))
                return resp, resp.content.iter_chunked(64 * 1024)
            resp.close()
            if hop == MAX_ARTIFACT_REDIRECTS:
                break
            url = urljoin(url, location)  # relative to the URL as named, not the checked address
            target = await self._artifact_target(url, request_id, start)
        raise self._artifact_refused(f"more than {MAX_ARTIFACT_REDIRECTS} redirects", request_id, start)

    async def _artifact_target(self, url: str, request_id: str, start: float) -> ResolvedHook:
        """Resolve and check one artifact URL. A refusal logs the reason, never the URL (it
        may carry a signature); a name that does not resolve is "unavailable", not refused."""
        try:
            async with asyncio.timeout(ARTIFACT_CONNECT_SECONDS):
                return await resolve_hook(url, self.artifact_policy, self._resolver)
        except (ResolveFailed, TimeoutError) as exc:
            self._count("artifact", start, "error")
            raise UpstreamFailure(
                503, "upstream_unavailable", "Could not fetch the video from the upstream.", Outcome.NOT_SENT
            ) from exc
        except HookRefused as refused:
            raise self._artifact_refused(refused.reason, request_id, start) from None

    def _artifact_refused(self, reason: str, request_id: str, start: float) -> UpstreamFailure:
        """Counted, logged for the operator with the reason; the tenant's message names no
        host or address (the answer reaches the tenant, the log does not)."""
        self._count("artifact", start, "refused")
        log_fields(logger, logging.WARNING, {"event": "artifact_refused", "request_id": request_id, "reason": reason})
        return UpstreamFailure(
            502,
            "upstream_error",
            "The upstream gave a video URL the gateway may not fetch (refused by its artifact URL rules);"
            " the gateway's log says why.",
            Outcome.REJECTED,
        )

    async def _get_artifact(self, target: ResolvedHook, request_id: str, start: float) -> aiohttp.ClientResponse:
        """One GET to the checked address. The pool keys connections by address and SNI name,
        so a TLS connection verified for one name is never reused for another."""
        assert self._session is not None
        try:
            resp = await self._session.get(
                target.url,
                headers={"host": target.host_header, "x-request-id": request_id},
                allow_redirects=False,
                server_hostname=target.sni_hostname,
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=ARTIFACT_CONNECT_SECONDS, sock_read=self.config.timeout_seconds
                ),
            )
        except Exception as exc:
            self._count("artifact", start, "error")  # the CDN's failure, never the relay's circuit
            raise UpstreamFailure(
                503, "upstream_unavailable", "Could not fetch the video from the upstream.", Outcome.NOT_SENT
            ) from exc
        return resp

    async def _call(
        self,
        operation: str,
        method: str,
        path: str,
        key_index: int,
        request_id: str,
        data: bytes | None,
        sent: float,
    ) -> Reply:
        """One call to the relay (`path` under its base URL) with the key `key_index`;
        `sent` (the circuit's clock, read just before) stamps its verdict."""
        assert self._http is not None
        if self._guards(operation) and not self.circuit.allow():
            self.metrics.upstream_requests.labels(self.id, operation, "circuit_open").inc()
            raise _circuit_open()
        headers = [
            ("Authorization", f"Bearer {self.config.api_keys[key_index % len(self.config.api_keys)]}"),
            ("X-Request-Id", request_id),
            ("Accept", "application/json"),
        ]
        if data is not None:
            headers.append(("Content-Type", "application/json"))
        timeout = self.config.timeout_seconds
        start = time.perf_counter()
        try:
            # a redirect is the relay's answer, never followed: its Location is a URL from the
            # upstream (§13: fetched only under the SSRF rules), and a create re-sent there
            # could be bought somewhere else (§14); not a task, it is an unreadable answer
            reply = await self._http.request(
                method, path, headers, data, timeout=timeout, connect_timeout=min(CONNECT_SECONDS, timeout)
            )
        except ConnectFailed as exc:
            self._failed(operation, start, "error", "could not connect", sent)
            raise UpstreamFailure(
                503, "upstream_unavailable", "Could not connect to the upstream.", Outcome.NOT_SENT
            ) from exc
        except ReplyTimeout as exc:
            self._failed(operation, start, "timeout", f"no answer within {timeout:g} s", sent)
            raise UpstreamFailure(
                504, "upstream_timeout", f"The upstream did not answer within {timeout:g} s.", Outcome.UNKNOWN
            ) from exc
        except ReplyFailed as exc:
            self._failed(operation, start, "error", "connection closed without an answer", sent)
            raise UpstreamFailure(
                502, "upstream_error", "The upstream closed the connection without an answer.", Outcome.UNKNOWN
            ) from exc
        self._count(operation, start, str(reply.status))
        self._check_key(key_index, reply.status, operation)
        return reply

    def _check_key(self, key_index: int, status: int, operation: str) -> None:
        """Note whether the relay took the key; log and count a refusal (never the key itself)."""
        index = key_index % len(self.config.api_keys)
        if status not in KEY_REFUSED_STATUSES:
            self.keys.accepted(index)
            return
        self.metrics.upstream_auth_failures.labels(str(index)).inc()
        self.last_error = f"key {index} refused ({status})"
        refusals = self.keys.refused(index)
        if refusals is not None:
            log_fields(
                logger,
                logging.ERROR,
                {
                    "event": "upstream_key_refused",
                    "relay": self.id,
                    "key_index": index,
                    "upstream_status": status,
                    "operation": operation,
                    "refusals": refusals,
                    "message": f"The upstream refuses upstream.api_keys[{index}] ({status});"
                    " every call with it fails until it is replaced.",
                },
            )

    def _task_or_fail(self, reply: Reply, operation: str) -> dict[str, Any]:
        if reply.status == 429:
            seconds = retry_after_seconds(reply.headers.get("retry-after"), time.time())
            raise UpstreamFailure(
                503,
                "upstream_rate_limited",
                f"The upstream is rate limiting the gateway; retry after {seconds} s.",
                Outcome.REJECTED,
                reply.status,
                {"retry-after": str(seconds)},
            )
        if reply.status >= 400 or reply.status < 200:
            raise UpstreamFailure(
                502,
                "upstream_error",
                f"The upstream refused the {operation} ({reply.status}){self._detail(reply.body)}.",
                Outcome.REJECTED,
                reply.status,
            )
        try:
            task = orjson.loads(reply.body)["task"]
            if not isinstance(task, dict) or not isinstance(task.get("id"), str) or not task["id"]:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise UpstreamFailure(
                502,
                "upstream_error",
                f"The upstream answered the {operation} with something that is not a task.",
                Outcome.UNKNOWN,
                reply.status,
            ) from None
        return task

    def _detail(self, body: bytes) -> str:
        """The upstream's own error message when it sent JSON; never raw HTML, never a key."""
        try:
            data = orjson.loads(body)
        except ValueError:
            return ""
        message: Any = None
        if isinstance(data, dict):
            err = data.get("error")
            message = (err.get("message") if isinstance(err, dict) else err) or data.get("message") or data.get("msg")
        if not isinstance(message, str) or not message:
            return ""
        for key in self.config.api_keys:
            message = message.replace(key, "[redacted]")
        message = "".join(ch for ch in message if ch.isprintable())[:200]
        return f": {message}"

    def _guards(self, operation: str) -> bool:
        """Whether the circuit stands before this call. With several relays it is the
        creates' alone: a status poll of a task pinned here neither waits for it nor moves
        it, so the probe after `cooldown_seconds` is exactly one create. The one relay of
        old guards its status calls too."""
        return operation == "create" or not self.answers_count

    def _failed(self, operation: str, start: float, status: str, error: str, sent: float) -> None:
        if self._guards(operation):
            self.circuit.failure(sent)
        self.last_error = f"{operation}: {error}"
        self._count(operation, start, status)

    def _count(self, operation: str, start: float, status: str) -> None:
        self.metrics.count(self.metrics.upstream_requests, (self.id, operation, status))
        self.metrics.observe(self.metrics.upstream_duration, (self.id, operation), time.perf_counter() - start)


def retry_after_seconds(value: str | None, now: float) -> int:
    """An upstream `Retry-After` (seconds, or an HTTP date) as whole seconds within
    1..MAX_RETRY_AFTER_SECONDS; DEFAULT_RETRY_AFTER_SECONDS when absent or unreadable."""
    value = (value or "").strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - now
        except (TypeError, ValueError, IndexError):
            return DEFAULT_RETRY_AFTER_SECONDS
    return max(1, min(MAX_RETRY_AFTER_SECONDS, math.ceil(seconds)))


def _short(message: str) -> str:
    return message[:LAST_ERROR_MAX]


def _circuit_open() -> UpstreamFailure:
    return UpstreamFailure(
        503,
        "upstream_unavailable",
        "The upstream is failing; the gateway is not calling it for a few seconds.",
        Outcome.NOT_SENT,
    )
