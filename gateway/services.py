"""The app's services: built whole by `build_services` in the app's lifespan, read by routes
through `routes.common.services(request)` and by the background workers.

Nothing here is half-built: the signer needs the store's secret and the task service needs
the signer and a started upstream client, so `build_services` opens the store and the
upstream first and constructs everything else from them, in order, before any request or
worker sees the result.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from gateway.auth import Authenticator
from gateway.config import Config, Tenant
from gateway.errors import bad_request
from gateway.gen2 import Gen2Request
from gateway.metrics import Metrics
from gateway.ssrf import HookPolicy, check_hook_url
from gateway.store.base import Store
from gateway.tasks import TaskService
from gateway.tokens import TokenSigner
from gateway.uploads import Uploads
from gateway.upstream import Upstream


@dataclass(frozen=True)
class Services:
    """Everything a request or a background worker needs, built once per app run."""

    config: Config
    store: Store
    metrics: Metrics
    clock: Callable[[], float]
    auth: Authenticator
    upstream: Upstream
    signer: TokenSigner
    tasks: TaskService
    uploads: Uploads
    hook_policies: Mapping[str, HookPolicy]
    tenant_limits: dict[str, dict[str, int | None]]

    def validate_hook(self, req: Gen2Request, tenant: Tenant, param: str) -> Gen2Request:
        """The tenant's own notify_hook must pass the SSRF rules before anything is charged."""
        if req.tenant_hook:
            problem = check_hook_url(req.tenant_hook, self.hook_policies[tenant.id])
            if problem:
                raise bad_request("invalid_notify_hook", f"notify_hook refused: {problem}", param)
        return req

    async def close(self) -> None:
        await self.upstream.close()
        await self.store.close()


async def build_services(config: Config, store: Store, metrics: Metrics, clock: Callable[[], float]) -> Services:
    """Open the store (it holds the signing secret when the config has none) and the
    upstream client, then build what depends on them. If opening fails, what was opened
    is closed again."""
    auth = Authenticator(config)  # reads a JWT key file: fails before anything is opened
    await store.open()
    upstream = Upstream(config.upstream, metrics)
    try:
        secret = config.server.signing_secret or await store.secret("signing", secrets.token_urlsafe(48))
        await upstream.start()
    except BaseException:
        await store.close()
        raise
    signer = TokenSigner(secret, clock)
    return Services(
        config=config,
        store=store,
        metrics=metrics,
        clock=clock,
        auth=auth,
        upstream=upstream,
        signer=signer,
        tasks=TaskService(config, store, upstream, signer, metrics, clock),
        uploads=Uploads(store, config.server.upload_ttl_seconds, clock),
        hook_policies={t.id: HookPolicy.from_hosts(t.policy.hook_hosts) for t in config.tenants},
        tenant_limits={t.id: vars(t.limits) for t in config.tenants},
    )
