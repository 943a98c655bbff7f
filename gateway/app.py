"""`create_app(config) -> Starlette`: everything wired explicitly, nothing at import time.

The store, the upstream client and the background workers (status poller, timeout sweep,
webhook dispatcher, store housekeeping) open in the lifespan and hang off one `Gateway`
object on `app.state`; every worker and replica runs the same workers, and the store's
claims keep them from doing the same work twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import sys
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response

from gateway.auth import Authenticator
from gateway.config import Config, Tenant
from gateway.errors import GatewayError, bad_request, error_response
from gateway.gen2 import Gen2Request
from gateway.logs import AccessLog
from gateway.metrics import FLUSH_SECONDS, Metrics
from gateway.middleware import GatewayMiddleware
from gateway.routes import admin, hooks, native, openai, ops
from gateway.ssrf import HookPolicy, check_hook_url
from gateway.store import open_store
from gateway.store.base import Store, StoreUnavailable
from gateway.tasks import TaskService
from gateway.tokens import TokenSigner
from gateway.upstream import Upstream
from gateway.uploads import Uploads
from gateway.webhooks import WebhookDispatcher

logger = logging.getLogger("gateway")
POLL_EVERY = 1.0
EXPIRE_EVERY = 5.0
MAINTAIN_EVERY = 5.0  # keeps the SQLite WAL short (docs/benchmarks.md, Soak)


@dataclass
class Gateway:
    """Everything a request or a background worker needs, built once per app."""

    config: Config
    store: Store
    metrics: Metrics
    auth: Authenticator
    upstream: Upstream
    clock: Callable[[], float] = time.time
    signer: TokenSigner = field(init=False)
    tasks: TaskService = field(init=False)
    uploads: Uploads = field(init=False)
    hook_policies: dict[str, HookPolicy] = field(init=False)
    tenant_limits: dict[str, dict[str, int | None]] = field(init=False)

    def __post_init__(self) -> None:
        self.hook_policies = {t.id: HookPolicy.from_hosts(t.policy.hook_hosts) for t in self.config.tenants}
        self.tenant_limits = {t.id: vars(t.limits) for t in self.config.tenants}

    async def start(self) -> None:
        await self.store.open()
        secret = self.config.server.signing_secret or await self.store.secret("signing", secrets.token_urlsafe(48))
        self.signer = TokenSigner(secret, self.clock)
        await self.upstream.start()
        self.tasks = TaskService(self.config, self.store, self.upstream, self.signer, self.metrics, self.clock)
        self.uploads = Uploads(self.store, self.config.server.upload_ttl_seconds, self.clock)

    async def stop(self) -> None:
        await self.upstream.close()
        await self.store.close()

    def validate_hook(self, req: Gen2Request, tenant: Tenant, param: str) -> Gen2Request:
        """The tenant's own notify_hook must pass the SSRF rules before anything is charged."""
        if req.tenant_hook:
            problem = check_hook_url(req.tenant_hook, self.hook_policies[tenant.id])
            if problem:
                raise bad_request("invalid_notify_hook", f"notify_hook refused: {problem}", param)
        return req

    def workers(self) -> list[Callable[[asyncio.Event], Awaitable[None]]]:
        dispatcher = WebhookDispatcher(
            self.store, {t.id: t for t in self.config.tenants}, self.config.webhooks,
            on_result=lambda tenant, result: self.metrics.webhook_deliveries.labels(tenant, result).inc(), clock=self.clock,
        )
        return [
            dispatcher.run_forever,
            _every(POLL_EVERY, self.tasks.poll_due),
            _every(EXPIRE_EVERY, self.tasks.expire),
            _every(MAINTAIN_EVERY, lambda: self.store.maintain(self.clock())),
            _every(FLUSH_SECONDS, self._flush_metrics),
        ]

    async def _flush_metrics(self) -> None:
        self.metrics.flush()


def _every(seconds: float, job: Callable[[], Awaitable[object]]) -> Callable[[asyncio.Event], Awaitable[None]]:
    async def loop(stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await job()
            except Exception:
                logger.exception("background job failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), seconds)

    return loop


async def _gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return error_response(exc)


async def _not_found(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 404)
    if status == 405:
        return error_response(GatewayError(405, "method_not_allowed", "Method not allowed on this route."))
    return error_response(GatewayError(status, "not_found", "No such route.", "invalid_request_error"))


async def _store_unavailable(request: Request, exc: Exception) -> Response:
    """Registered for StoreUnavailable itself (both stores raise it for an outage, and only
    for one), so Starlette's ExceptionMiddleware answers it: the access log and metrics say
    503, and the client's keep-alive connection stays open (ServerErrorMiddleware, which
    answers `Exception`, re-raises and uvicorn then closes the connection under the
    client's next request). Its message names the cause; no credential is in it."""
    logger.error("store unavailable: %s", exc)
    return error_response(GatewayError(503, "store_unavailable", "The gateway's store is not answering; retry shortly.", headers={"retry-after": "1"}))


async def _unexpected(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error", exc_info=exc)
    return error_response(GatewayError(500, "internal_error", "The gateway failed to handle this request."))


def create_app(config: Config, *, metrics: Metrics | None = None, clock: Callable[[], float] = time.time, background: bool = True) -> Starlette:
    metrics = metrics or Metrics([t.id for t in config.tenants], upstream_keys=len(config.upstream.api_keys))
    access_log = AccessLog(sys.stdout)
    gw = Gateway(config, open_store(config.store.url), metrics, Authenticator(config), Upstream(config.upstream, metrics), clock)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gw.start()
        stop = asyncio.Event()
        jobs = [asyncio.create_task(w(stop)) for w in gw.workers()] if background else []
        try:
            yield
        finally:
            stop.set()
            await asyncio.gather(*jobs, return_exceptions=True)
            await gw.stop()
            metrics.flush()
            access_log.flush()

    app = Starlette(
        routes=[*native.routes, *openai.routes, *hooks.routes, *ops.routes, *admin.routes],
        middleware=[Middleware(GatewayMiddleware, metrics=metrics, access_log=access_log, max_body_bytes=config.server.max_body_bytes, trusted_proxies=config.server.trusted_proxies)],
        exception_handlers={
            GatewayError: _gateway_error, 404: _not_found, 405: _not_found,
            StoreUnavailable: _store_unavailable, Exception: _unexpected,
        },
        lifespan=lifespan,
    )
    app.state.gateway = gw
    return app
