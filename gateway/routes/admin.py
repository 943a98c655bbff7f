"""Operator routes under /admin, for the keys in `[admin] keys` (hashes, like tenants')."""

from __future__ import annotations

import hmac
from dataclasses import asdict

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.auth import key_hash
from gateway.errors import GatewayError, not_found
from gateway.routes.common import gateway, json_response


def _require_admin(request: Request) -> None:
    gw = gateway(request)
    scheme, _, credential = request.headers.get("authorization", "").partition(" ")
    hashed = key_hash(credential.strip()) if scheme.lower() == "bearer" and credential.strip() else ""
    if not any(hmac.compare_digest(hashed, k) for k in gw.config.admin_keys):
        gw.metrics.auth_failures.labels("unknown_key").inc()
        raise GatewayError(401, "invalid_api_key", "An admin key is required.", "authentication_error", None, {"www-authenticate": "Bearer"})


async def tenant_usage(request: Request) -> Response:
    """Limits and current usage of one tenant (UTC day and month)."""
    _require_admin(request)
    gw = gateway(request)
    tenant = gw.config.tenant(request.path_params["tenant"])
    if tenant is None:
        raise not_found("No such tenant.", "tenant_not_found", "tenant")
    usage = await gw.store.usage(tenant.id, gw.clock())
    return json_response({"tenant": tenant.id, "enabled": tenant.enabled, "limits": asdict(tenant.limits), "usage": asdict(usage)})


routes = [Route("/admin/tenants/{tenant}/usage", tenant_usage, methods=["GET"])]
