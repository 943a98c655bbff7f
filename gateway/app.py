"""`create_app(config) -> Starlette`: everything wired explicitly, nothing at import time.

The lifespan opens the store and builds the app's `Services` (`gateway.services`) whole,
puts them on `app.state.services`, and runs the background workers (status poller,
timeout sweep, webhook dispatcher, store housekeeping, metrics flush). Every worker and
replica runs the same workers; the store's claims keep them from doing the same work twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route

from gateway.config import Config
from gateway.errors import GatewayError, error_response
from gateway.logs import AccessLog
from gateway.metrics import FLUSH_SECONDS, Metrics
from gateway.middleware import GatewayMiddleware
from gateway.reload import RELAY_SIGNAL, ReloadIds, reload_config
from gateway.routes import admin, console, hooks, native, openai, ops
from gateway.services import LAST_USED_FLUSH_SECONDS, Services, build_services
from gateway.store import open_store
from gateway.store.base import StoreUnavailable
from gateway.webhooks import WebhookDispatcher

logger = logging.getLogger("gateway")
POLL_EVERY = 1.0
EXPIRE_EVERY = 5.0
AUDIT_PRUNE_EVERY = 3600.0
MAINTAIN_EVERY = 5.0  # keeps the SQLite WAL short (docs/benchmarks.md, Soak)
Worker = Callable[[asyncio.Event], Coroutine[Any, Any, None]]
# Container allocations (net) between two young-generation collections; CPython's default is
# 700. Every request in flight holds hundreds of objects (coroutines, frames, dicts), so at
# 700 each collection found a few thousand live ones, promoted them, and the promotions
# brought full collections of the whole heap: ~90 µs of CPU per create (docs/benchmarks.md).
GC_YOUNG_THRESHOLD = 10_000


def workers(services: Services) -> list[Worker]:
    """The background loops every process runs until its lifespan ends."""
    metrics, store, tasks, clock = services.metrics, services.store, services.tasks, services.clock
    directory = services.directory
    dispatcher = WebhookDispatcher(
        store,
        lambda: directory.current,
        on_result=lambda tenant, result: metrics.count(metrics.webhook_deliveries, (tenant, result)),
        clock=clock,
    )

    async def flush_metrics() -> None:
        services.relays.export()  # each worker's view of its relays, for gateway_relay_up
        metrics.flush()

    async def prune_audit() -> None:
        await store.prune_audit(clock() - directory.current.config.audit_retention_days * 86400)

    return [
        directory.run_forever,
        _every(services.last_used.interval, services.last_used.flush),
        _every(AUDIT_PRUNE_EVERY, prune_audit),
        dispatcher.run_forever,
        _every(POLL_EVERY, tasks.poll_due),
        _every(EXPIRE_EVERY, tasks.expire),
        _every(MAINTAIN_EVERY, lambda: store.maintain(clock())),
        _every(FLUSH_SECONDS, flush_metrics),
    ]


def _every(seconds: float, job: Callable[[], Awaitable[object]]) -> Worker:
    """A worker that runs `job` every `seconds` until stopped; a failed run is logged, not fatal."""

    async def loop(stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await job()
            except Exception:
                logger.exception("background job failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), seconds)

    return loop


def settle_gc() -> None:
    """Once the app is built: move what startup made (modules, config, routes, the
    directory) out of the collector's sight, and collect the young generation less often
    (GC_YOUNG_THRESHOLD). Garbage without cycles is freed by reference counting as before;
    cycles wait a little longer. For the served process only (`serve`), not for tests
    that build many apps in one interpreter."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def _last_used_interval() -> float:
    """How often `last_used_at` is written: 30 s (tests shorten it through the environment)."""
    return float(os.environ.get("GATEWAY_LAST_USED_FLUSH_SECONDS", LAST_USED_FLUSH_SECONDS))


def _reload_on_sighup(services: Services, path: str) -> Callable[[], None]:
    """Install this worker's reload handlers; returns what removes them. SIGHUP starts one
    reload under a fresh audit id; under `serve --workers N` the supervisor's relay
    (`RELAY_SIGNAL`) starts one for every id it announced since the last, and none when
    there is no new one (a relay merged with the one before). Each reload is a task, kept
    referenced until done."""
    loop = asyncio.get_running_loop()
    running: set[asyncio.Task[bool]] = set()
    ids = ReloadIds.from_env()  # the audit ids a supervisor announced, one per reload

    def start(audit_ids: list[str]) -> None:
        task = loop.create_task(reload_config(services, path, audit_ids))
        running.add(task)
        task.add_done_callback(running.discard)

    def relayed() -> None:
        announced = ids.announced()
        if announced:
            start(announced)

    def remove() -> None:
        loop.remove_signal_handler(signal.SIGHUP)
        if ids.path is not None:
            loop.remove_signal_handler(RELAY_SIGNAL)

    loop.add_signal_handler(signal.SIGHUP, start, [])
    if ids.path is not None:
        loop.add_signal_handler(RELAY_SIGNAL, relayed)
    return remove


async def _gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return error_response(exc)


async def _not_found(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 404)
    if status == 405:
        allow = {"allow": ", ".join(_allowed_methods(request))}
        message = "Method not allowed on this route."
        return error_response(GatewayError(405, "method_not_allowed", message, "invalid_request_error", headers=allow))
    return error_response(GatewayError(status, "not_found", "No such route.", "invalid_request_error"))


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves on this path (RFC 9110's `Allow` of a 405): a path's
    methods are often split over several routes, and Starlette's 405 names only the first's."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.methods and route.matches(request.scope)[0] != Match.NONE:
            methods |= route.methods
    return sorted(methods)


async def _store_unavailable(request: Request, exc: Exception) -> Response:
    """Registered for StoreUnavailable itself (both stores raise it for an outage, and only
    for one), so Starlette's ExceptionMiddleware answers it: the access log and metrics say
    503, and the client's keep-alive connection stays open (ServerErrorMiddleware, which
    answers `Exception`, re-raises and uvicorn then closes the connection under the
    client's next request). Its message names the cause; no credential is in it."""
    logger.error("store unavailable: %s", exc)
    return error_response(
        GatewayError(
            503,
            "store_unavailable",
            "The gateway's store is not answering; retry shortly.",
            headers={"retry-after": "1"},
        )
    )


async def _unexpected(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error", exc_info=exc)
    return error_response(GatewayError(500, "internal_error", "The gateway failed to handle this request."))


def create_app(
    config: Config,
    *,
    metrics: Metrics | None = None,
    clock: Callable[[], float] = time.time,
    background: bool = True,
    config_path: str | None = None,
    tune_gc: bool = False,
) -> Starlette:
    """The app for `config`. Its services exist from startup to shutdown of its lifespan
    (`app.state.services`); `background=False` runs no workers (tests drive them). With
    `config_path`, SIGHUP re-reads that file (`gateway.reload`). `tune_gc` (the served
    process): `settle_gc` once the services are built."""
    metrics = metrics or Metrics([t.id for t in config.tenants], upstream_keys=len(config.upstream.api_keys))
    access_log = AccessLog(sys.stdout)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        services = await build_services(
            config, open_store(config.store.url), metrics, clock, last_used_interval=_last_used_interval()
        )
        app.state.services = services
        if tune_gc:
            settle_gc()
        stop = asyncio.Event()
        jobs = [asyncio.create_task(run(stop)) for run in workers(services)] if background else []
        reloading = _reload_on_sighup(services, config_path) if config_path else None
        try:
            yield
        finally:
            if reloading is not None:
                reloading()
            stop.set()
            await asyncio.gather(*jobs, return_exceptions=True)
            await services.close()
            metrics.flush()
            access_log.flush()

    middleware = Middleware(
        GatewayMiddleware,
        metrics=metrics,
        access_log=access_log,
        max_body_bytes=config.server.max_body_bytes,
        trusted_proxies=config.server.trusted_proxies,
    )
    return Starlette(
        routes=[*native.routes, *openai.routes, *hooks.routes, *ops.routes, *admin.routes, *console.routes()],
        middleware=[middleware],
        exception_handlers={
            GatewayError: _gateway_error,
            404: _not_found,
            405: _not_found,
            StoreUnavailable: _store_unavailable,
            Exception: _unexpected,
        },
        lifespan=lifespan,
    )
