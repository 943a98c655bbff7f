"""Tenant webhooks (contract §5): signing, and delivery from the store's outbox.

Events are written to the store in the same transaction as the status change they report,
so a crash loses none; `WebhookDispatcher` claims due ones (leased, so replicas do not
deliver one event twice at the same time), POSTs them and records the outcome. Delivery is
at least once: a receiver deduplicates by `x-gateway-event-id`, which stays the same on
every attempt.

Retries: any non-2xx answer (a 3xx too: redirects are never followed, they could lead
anywhere), a network error, a timeout, or a hook the SSRF rules refuse is a failed attempt,
retried after `WebhookConfig.backoff(attempt)` until `max_attempts`, then given up: the
store keeps the event dead for 7 days, its task's later events waiting behind it, for an
operator to list and redeliver (admin API, `Store.redeliver_webhook`). A
refused hook is retried rather than dropped because what refuses it can change: DNS
answers move, and an operator may widen `hook_hosts` and restart. The whole attempt
(DNS, connect, answer) is bounded by `timeout`, kept below the claim's lease.

Each attempt connects to the address `ssrf.resolve_hook` checked, never re-resolving: the
URL's host is replaced by that IP, `Host` carries the original name, and for https the
`sni_hostname` extension makes TLS verify the certificate against the original name.
Keep-alive is off in the dispatcher's own client, so one TLS connection verified for one
name is never reused for another name on the same address. A caller's client may be shared:
its default headers, cookies and auth are never applied to a delivery.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Mapping

import httpx

from gateway.config import Config, Tenant, WebhookConfig
from gateway.directory import Directory
from gateway.logs import log_fields
from gateway.ssrf import HookRefused, Resolver, resolve_hook
from gateway.store.base import Store, WebhookEvent

USER_AGENT = "runway-gateway-webhooks/1"
log = logging.getLogger("gateway.webhooks")


def sign(secret: str, body: bytes, timestamp: int, *older: str) -> str:
    """`t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`: the timestamp is signed too,
    so a captured delivery cannot be replayed later with a fresh time. During a secret
    rotation's grace period each `older` secret adds its own `v1=`, so a receiver still
    holding the previous secret keeps verifying."""
    payload = f"{timestamp}.".encode() + body
    macs = [hmac.new(s.encode(), payload, hashlib.sha256).hexdigest() for s in (secret, *older)]
    return f"t={timestamp}," + ",".join(f"v1={mac}" for mac in macs)


def verify(secret: str, body: bytes, header: str, tolerance: float = 300, now: float | None = None) -> bool:
    """Check an `x-gateway-signature` header against the raw request body (the bytes as
    received, before any JSON parsing). Copy this into your receiver. Accepts any of several
    `v1=` values (room for secret rotation); refuses a timestamp more than `tolerance`
    seconds away from now."""
    try:
        fields = [part.strip().split("=", 1) for part in header.split(",")]
        timestamp = int(next(v for k, v in fields if k == "t"))
        candidates = [v for k, v in fields if k == "v1"]
    except (ValueError, StopIteration, AttributeError):
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        return False
    expected = sign(secret, body, timestamp).split("v1=", 1)[1]
    return any(hmac.compare_digest(expected.encode(), c.encode()) for c in candidates)


class WebhookDispatcher:
    """Delivers due webhook events from the store's outbox; run `run_forever` in one task
    per process (several processes and replicas may run it at once)."""

    def __init__(
        self,
        store: Store,
        tenants: Mapping[str, Tenant] | Callable[[], Directory],
        config: WebhookConfig | None = None,
        client: httpx.AsyncClient | None = None,
        on_result: Callable[[str, str], None] | None = None,
        clock: Callable[[], float] = time.time,
        lease: float = 20.0,
        batch: int = 50,
        *,
        timeout: float = 10.0,
        concurrency: int = 16,
        resolver: Resolver | None = None,
    ):
        if timeout >= lease:
            raise ValueError(
                "timeout must be shorter than the lease, or another worker could take the event mid-delivery"
            )
        self._store = store
        if isinstance(tenants, Mapping):  # fixed tenants and settings (tests): a directory of them
            fixed = Directory.build(Config(tenants=tuple(tenants.values()), webhooks=config or WebhookConfig()), None)
            self._directory: Callable[[], Directory] = lambda: fixed
        else:  # read per event: tenants, secrets and retry settings as a refresh or reload left them
            self._directory = tenants
        self._client = client
        self._owns_client = client is None
        self._on_result = on_result
        self._clock = clock
        self._lease = lease
        self._batch = batch
        self._timeout = timeout
        self._concurrency = concurrency
        self._resolver = resolver

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                follow_redirects=False,
                trust_env=False,  # an env proxy would re-resolve the name we checked
                limits=httpx.Limits(max_keepalive_connections=0),
            )
        return self._client

    async def aclose(self) -> None:
        """Close the HTTP client if the dispatcher made it (a caller's client is the caller's)."""
        if self._owns_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    async def run_once(self) -> int:
        """Claim due events and deliver them, at most `concurrency` at a time. Returns how
        many were claimed."""
        events = await self._store.claim_webhooks(self._clock(), self._batch, self._lease)
        if not events:
            return 0
        gate = asyncio.Semaphore(self._concurrency)

        async def one(event: WebhookEvent) -> None:
            async with gate:
                await self._process(event)

        results = await asyncio.gather(*(one(e) for e in events), return_exceptions=True)
        for event, result in zip(events, results, strict=True):
            if isinstance(result, Exception):  # the store failed; the lease expires and it is retried
                log_fields(
                    log,
                    logging.ERROR,
                    {"event": "webhook_finish_failed", "event_id": event.event_id, "error": type(result).__name__},
                )
        return len(events)

    async def run_forever(self, stop: asyncio.Event, interval: float = 0.5) -> None:
        """Poll the outbox until `stop` is set; a full batch means a backlog, so go again at once."""
        try:
            while not stop.is_set():
                try:
                    claimed = await self.run_once()
                except Exception:
                    log.exception("webhook dispatch round failed")
                    claimed = 0
                if claimed >= self._batch:
                    continue
                try:
                    await asyncio.wait_for(stop.wait(), interval)
                except TimeoutError:
                    pass
        finally:
            await self.aclose()

    async def _process(self, event: WebhookEvent) -> None:
        attempt = event.attempts + 1
        directory = self._directory()
        if event.tenant_id not in directory.tenants:  # removed: nobody to sign for or deliver to
            await self._give_up(event, attempt, "tenant no longer configured")
            return
        error = await self._attempt(event, directory, attempt)
        if error is None:
            await self._store.finish_webhook(
                event.event_id, delivered=True, attempts=attempt, next_at=None, now=self._clock()
            )
            self._report(event.tenant_id, "delivered")
        elif attempt >= directory.config.webhooks.max_attempts:
            await self._give_up(event, attempt, error)
        else:
            now = self._clock()
            next_at = now + directory.config.webhooks.backoff(attempt)
            await self._store.finish_webhook(
                event.event_id, delivered=False, attempts=attempt, next_at=next_at, now=now, error=error
            )
            self._report(event.tenant_id, "failed")
            log_fields(
                log,
                logging.DEBUG,
                {
                    "event": "webhook_retry",
                    "event_id": event.event_id,
                    "tenant": event.tenant_id,
                    "attempts": attempt,
                    "error": error,
                },
            )

    async def _give_up(self, event: WebhookEvent, attempts: int, error: str) -> None:
        await self._store.finish_webhook(
            event.event_id, delivered=False, attempts=attempts, next_at=None, now=self._clock(), error=error
        )
        self._report(event.tenant_id, "gave_up")
        log_fields(
            log,
            logging.WARNING,
            {
                "event": "webhook_gave_up",
                "event_id": event.event_id,
                "tenant": event.tenant_id,
                "attempts": attempts,
                "error": error,
            },
        )

    def _report(self, tenant_id: str, result: str) -> None:
        if self._on_result is not None:
            self._on_result(tenant_id, result)

    async def _attempt(self, event: WebhookEvent, directory: Directory, attempt: int) -> str | None:
        """One delivery; None on a 2xx, else a short reason fit for logs and the event's
        `last_error` (no URL, body or secret): `http 500`, `timeout`, `ConnectError`,
        `refused: <rule>`."""
        try:
            async with asyncio.timeout(self._timeout):
                hook = await resolve_hook(event.url, directory.hook_policies[event.tenant_id], self._resolver)
                headers = {
                    "host": hook.host_header,
                    "content-type": "application/json",
                    "user-agent": USER_AGENT,
                    "x-gateway-event-id": event.event_id,
                    "x-gateway-delivery-attempt": str(attempt),
                }
                now = self._clock()
                secrets = directory.webhook_secrets(event.tenant_id, now)
                if secrets:  # a signature with an empty key proves nothing
                    headers["x-gateway-signature"] = sign(secrets[0], event.body, int(now), *secrets[1:])
                extensions: dict[str, object] = {"timeout": httpx.Timeout(self._timeout).as_dict()}
                if hook.sni_hostname:
                    extensions["sni_hostname"] = hook.sni_hostname
                # A bare Request, not client.build_request: a shared client's default headers,
                # cookies and auth (an upstream key!) must never reach a tenant's hook.
                request = httpx.Request("POST", hook.url, content=event.body, headers=headers, extensions=extensions)
                # Never read the body: a hostile receiver could stream without end.
                response = await self._http().send(request, auth=None, follow_redirects=False, stream=True)
                await response.aclose()
        except HookRefused as e:
            return f"refused: {e.reason}"
        except TimeoutError:
            return "timeout"
        except Exception as e:  # network, TLS, protocol: still a counted attempt, never a stuck event
            return type(e).__name__
        if 200 <= response.status_code < 300:
            return None
        return f"http {response.status_code}"
