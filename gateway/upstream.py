"""The one client of the relay: pooled, timed out, behind a circuit breaker.

aiohttp directly, not httpx: httpx's default transport costs several times aiohttp's CPU
per proxied request (docs/benchmarks.md, the floors), and aiohttp's
exceptions say precisely whether a request left the machine, which decides whether a
charge is refunded (`Outcome.NOT_SENT`, `REJECTED`) or kept until settled (`UNKNOWN`).

Artifact URLs come from the upstream's task objects, so they are fetched under the same
SSRF rules as tenant webhooks (`gateway.ssrf`), with `artifact_hosts` as the allow-list:
every hop is resolved and checked, the request goes to the checked address (the name in
`Host` and in TLS's SNI and certificate check), and redirects are followed by hand, each
new URL checked again, at most `MAX_ARTIFACT_REDIRECTS` of them.

Two upstream answers are the operator's problem more than the tenant's: a 429 (the relay
key is rate limited: the tenant gets 503 `upstream_rate_limited` with a `retry-after`) and
a 401/403 (the relay refuses the key itself: `KeyHealth` logs it at error level, counts it
and `/readyz` shows it).
"""

from __future__ import annotations

import asyncio
import email.utils
import enum
import itertools
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin

import aiohttp
import orjson

from gateway.config import UpstreamConfig
from gateway.errors import GatewayError
from gateway.logs import log_fields
from gateway.metrics import Metrics
from gateway.ssrf import HookPolicy, HookRefused, ResolvedHook, ResolveFailed, Resolver, resolve_hook

logger = logging.getLogger("gateway.upstream")
MAX_REPLY_BYTES = 2 * 1024 * 1024
CIRCUIT_FAILURES = 5
CIRCUIT_OPEN_SECONDS = 10.0
KEEPALIVE_SECONDS = 4.0
MAX_ARTIFACT_REDIRECTS = 5
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
ARTIFACT_CONNECT_SECONDS = 5.0  # DNS, then connect: each bounded by this
KEY_REFUSED_STATUSES = (401, 403)
AUTH_LOG_INTERVAL_SECONDS = 60.0  # at most one error line per refused key per interval
DEFAULT_RETRY_AFTER_SECONDS = 5  # an upstream 429 that did not say when
MAX_RETRY_AFTER_SECONDS = 3600


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


class CircuitBreaker:
    """Closed -> open after N consecutive connection failures or timeouts; open answers at
    once for `open_seconds`; then half-open lets one request through, whose success
    closes the circuit and whose failure opens it again."""

    def __init__(
        self,
        failures: int = CIRCUIT_FAILURES,
        open_seconds: float = CIRCUIT_OPEN_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold, self.open_seconds, self.clock = failures, open_seconds, clock
        self.failures = 0
        self.opened_at: float | None = None
        self.probing = False

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half_open" if self.clock() - self.opened_at >= self.open_seconds else "open"

    def allow(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self.probing:
            self.probing = True
            return True
        return False

    def success(self) -> None:
        self.failures, self.opened_at, self.probing = 0, None, False

    def failure(self) -> None:
        self.failures += 1
        self.probing = False
        if self.opened_at is not None or self.failures >= self.threshold:
            self.opened_at = self.clock()


class KeyHealth:
    """Which relay keys the relay refuses (401/403). A wrong, revoked or unfunded key fails
    every create that uses it, and no tenant can fix that: the operator must hear of it,
    but once per interval, not once per request. A key counts as failing from a refusal
    until the relay next accepts it (any other answer to a call made with it)."""

    def __init__(
        self, interval: float = AUTH_LOG_INTERVAL_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval, self.clock = interval, clock
        self.failing: set[int] = set()
        self._logged_at: dict[int, float] = {}
        self._unlogged: dict[int, int] = {}

    def refused(self, key_index: int) -> int | None:
        """Record a refusal. Returns the number of refusals the log line to write now
        stands for, or None while this key's last line is younger than the interval."""
        self.failing.add(key_index)
        count = self._unlogged.get(key_index, 0) + 1
        now = self.clock()
        last = self._logged_at.get(key_index)
        if last is not None and now - last < self.interval:
            self._unlogged[key_index] = count
            return None
        self._logged_at[key_index] = now
        self._unlogged[key_index] = 0
        return count

    def accepted(self, key_index: int) -> None:
        self.failing.discard(key_index)

    @property
    def state(self) -> str:
        return "failing" if self.failing else "ok"


@dataclass
class _Reply:
    status: int
    body: bytes
    retry_after: str | None = None


class Upstream:
    def __init__(self, config: UpstreamConfig, metrics: Metrics, resolver: Resolver | None = None):
        self.metrics = metrics
        self.circuit = CircuitBreaker()
        self._resolver = resolver  # None: the system's; tests inject one
        self.keys = KeyHealth()
        self._turn = itertools.count()
        self._session: aiohttp.ClientSession | None = None
        self.reconfigure(config)

    def reconfigure(self, config: UpstreamConfig) -> None:
        """Take (re)loaded settings: keys, URLs, the artifact allow-list, the timeout. The
        pooled session stays; a request uses the timeout current when it starts."""
        self.config = config
        self.artifact_policy = HookPolicy.from_hosts(config.artifact_hosts, setting="artifact_hosts")
        self._timeout = aiohttp.ClientTimeout(total=config.timeout_seconds, connect=min(5.0, config.timeout_seconds))

    async def start(self) -> None:
        # An idle pooled connection is dropped before common servers drop it (uvicorn: 5 s):
        # a create sent on a connection the relay is closing fails with an unknown outcome.
        connector = aiohttp.TCPConnector(limit=256, keepalive_timeout=KEEPALIVE_SECONDS, ttl_dns_cache=60)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            json_serialize=lambda o: orjson.dumps(o).decode(),
            auto_decompress=True,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def next_key_index(self) -> int:
        """New tasks take the configured keys in turn (however many a reload left)."""
        return next(self._turn) % len(self.config.api_keys)

    async def create(self, body: dict[str, Any], key_index: int, request_id: str) -> dict[str, Any]:
        """POST /runway/tasks; returns the task object or raises UpstreamFailure."""
        reply = await self._call(
            "create", "POST", self.config.base_url + "/runway/tasks", key_index, request_id, orjson.dumps(body)
        )
        return self._task_or_fail(reply, "create")

    async def status(self, task_id: str, key_index: int, request_id: str) -> dict[str, Any] | None:
        """The upstream's view of one task; None when it does not know the id (404)."""
        path = self.config.status_path.replace("{id}", task_id)
        reply = await self._call("status", "GET", self.config.base_url + path, key_index, request_id, None)
        if reply.status == 404:
            return None
        return self._task_or_fail(reply, "status")

    async def stream(self, url: str, request_id: str) -> tuple[aiohttp.ClientResponse, AsyncIterator[bytes]]:
        """Open an artifact URL for streaming (no upstream key: artifact URLs are signed CDN
        links), following redirects under the SSRF rules. Returns the first non-redirect
        answer; raises UpstreamFailure (502 for a URL the rules refuse)."""
        start = time.perf_counter()
        target = await self._artifact_target(url, request_id, start)  # before the circuit: nothing sent yet
        if not self.circuit.allow():
            raise _circuit_open()
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
            self._count("artifact", start, "error")
            self.circuit.failure()
            raise UpstreamFailure(
                503, "upstream_unavailable", "Could not fetch the video from the upstream.", Outcome.NOT_SENT
            ) from exc
        self.circuit.success()
        return resp

    async def _call(
        self, operation: str, method: str, url: str, key_index: int, request_id: str, data: bytes | None
    ) -> _Reply:
        assert self._session is not None
        if not self.circuit.allow():
            self.metrics.upstream_requests.labels(operation, "circuit_open").inc()
            raise _circuit_open()
        headers = {
            "authorization": f"Bearer {self.config.api_keys[key_index % len(self.config.api_keys)]}",
            "x-request-id": request_id,
            "accept": "application/json",
        }
        if data is not None:
            headers["content-type"] = "application/json"
        start = time.perf_counter()
        try:
            async with self._session.request(method, url, data=data, headers=headers, timeout=self._timeout) as resp:
                body = await resp.content.read(MAX_REPLY_BYTES)
                reply = _Reply(resp.status, body, resp.headers.get("retry-after"))
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            self._failed(operation, start, "error")
            raise UpstreamFailure(
                503, "upstream_unavailable", "Could not connect to the upstream.", Outcome.NOT_SENT
            ) from exc
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            self._failed(operation, start, "timeout")
            raise UpstreamFailure(
                504,
                "upstream_timeout",
                f"The upstream did not answer within {self.config.timeout_seconds:g} s.",
                Outcome.UNKNOWN,
            ) from exc
        except aiohttp.ClientError as exc:
            self._failed(operation, start, "error")
            raise UpstreamFailure(
                502, "upstream_error", "The upstream closed the connection without an answer.", Outcome.UNKNOWN
            ) from exc
        self.circuit.success()
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
        refusals = self.keys.refused(index)
        if refusals is not None:
            log_fields(
                logger,
                logging.ERROR,
                {
                    "event": "upstream_key_refused",
                    "key_index": index,
                    "upstream_status": status,
                    "operation": operation,
                    "refusals": refusals,
                    "message": f"The upstream refuses upstream.api_keys[{index}] ({status});"
                    " every call with it fails until it is replaced.",
                },
            )

    def _task_or_fail(self, reply: _Reply, operation: str) -> dict[str, Any]:
        if reply.status == 429:
            seconds = retry_after_seconds(reply.retry_after, time.time())
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

    def _failed(self, operation: str, start: float, status: str) -> None:
        self.circuit.failure()
        self._count(operation, start, status)

    def _count(self, operation: str, start: float, status: str) -> None:
        self.metrics.count(self.metrics.upstream_requests, (operation, status))
        self.metrics.observe(self.metrics.upstream_duration, (operation,), time.perf_counter() - start)


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


def _circuit_open() -> UpstreamFailure:
    return UpstreamFailure(
        503,
        "upstream_unavailable",
        "The upstream is failing; the gateway is not calling it for a few seconds.",
        Outcome.NOT_SENT,
    )
