"""The app's services: built whole by `build_services` in the app's lifespan, read by routes
through `routes.common.services(request)` and by the background workers.

Nothing here is half-built: the signer needs the store's secret and the task service needs
the signer and a started upstream client, so `build_services` opens the store and the
upstream first and constructs everything else from them, in order, before any request or
worker sees the result.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from gateway.auth import Authenticator
from gateway.config import Config, Tenant
from gateway.directory import DirectoryCache, LastUsed
from gateway.errors import bad_request
from gateway.gen2 import Gen2Request
from gateway.jwts import jwt_verifier
from gateway.metrics import Metrics
from gateway.relays import Relays
from gateway.ssrf import HookPolicy, check_hook_url
from gateway.store.base import Store
from gateway.tasks import TaskService
from gateway.tokens import TokenSigner
from gateway.uploads import Uploads

logger = logging.getLogger("gateway")
LAST_USED_FLUSH_SECONDS = 30.0


@dataclass(frozen=True)
class Services:
    """Everything a request or a background worker needs, built once per app run. What the
    config file and the store's directory decide (tenants, keys, limits, policy, pricing)
    is read through `directory.current`, the one object a refresh or a reload replaces."""

    store: Store
    metrics: Metrics
    clock: Callable[[], float]
    directory: DirectoryCache
    auth: Authenticator
    last_used: LastUsed
    relays: Relays
    signer: TokenSigner
    tasks: TaskService
    uploads: Uploads

    @property
    def config(self) -> Config:
        return self.directory.current.config

    @property
    def tenant_limits(self) -> dict[str, dict[str, int | None]]:
        return self.directory.current.tenant_limits()

    def validate_hook(self, req: Gen2Request, tenant: Tenant, param: str) -> Gen2Request:
        """The tenant's own notify_hook must pass the SSRF rules before anything is charged."""
        if req.tenant_hook:
            policy = self.directory.current.hook_policies.get(tenant.id) or HookPolicy.from_hosts(
                tenant.policy.hook_hosts
            )
            problem = check_hook_url(req.tenant_hook, policy)
            if problem:
                raise bad_request("invalid_notify_hook", f"notify_hook refused: {problem}", param)
        return req

    def reconfigure(self, config: Config) -> None:
        """Take a reloaded (already validated) config file: the directory's config part,
        JWT verification, pricing and upstream settings. Raises (changing nothing) when the
        JWT key cannot be read."""
        jwt = jwt_verifier(config.jwt)
        self.directory.reconfigure(config, jwt)
        self.tasks.config = config
        self.relays.reconfigure(config)

    async def close(self) -> None:
        try:
            await self.last_used.flush()
        except Exception:
            logger.exception("last_used_at flush at shutdown failed")
        await self.relays.close()
        await self.store.close()


async def build_services(
    config: Config,
    store: Store,
    metrics: Metrics,
    clock: Callable[[], float],
    *,
    last_used_interval: float = LAST_USED_FLUSH_SECONDS,
) -> Services:
    """Open the store (it holds the signing secret when the config has none), read its
    directory and open the upstream client, then build what depends on them. If opening
    fails, what was opened is closed again."""
    jwt = jwt_verifier(config.jwt)  # reads a JWT key file: fails before anything is opened
    await store.open()
    directory = DirectoryCache(config, jwt, store, on_change=lambda d: metrics.add_tenants(d.tenants))
    relays = Relays(config, metrics)
    try:
        await directory.refresh()  # the store's tenants and keys before the first request
        secret = config.server.signing_secret or await store.secret("signing", secrets.token_urlsafe(48))
        await relays.start()
    except BaseException:
        await store.close()
        raise
    signer = TokenSigner(secret, clock)
    return Services(
        store=store,
        metrics=metrics,
        clock=clock,
        directory=directory,
        auth=Authenticator(lambda: directory.current, clock),
        last_used=LastUsed(store, last_used_interval),
        relays=relays,
        signer=signer,
        tasks=TaskService(config, store, relays, signer, metrics, clock),
        uploads=Uploads(store, config.server.upload_ttl_seconds, clock),
    )
