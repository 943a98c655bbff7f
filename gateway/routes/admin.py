"""Operator routes under /admin, for the keys in `[admin] keys` (hashes, like tenants')."""

from __future__ import annotations

import hmac
from dataclasses import asdict

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.auth import bearer_credential, key_hash
from gateway.errors import GatewayError, not_found
from gateway.routes.common import json_response, services


def _require_admin(request: Request) -> None:
    s = services(request)
    credential = bearer_credential(request.headers.get("authorization"))
    hashed = key_hash(credential) if credential else ""
    if not any(hmac.compare_digest(hashed, k) for k in s.config.admin_keys):
        s.metrics.count(s.metrics.auth_failures, ("unknown_key",))
        raise GatewayError(
            401,
            "invalid_api_key",
            "An admin key is required.",
            "authentication_error",
            None,
            {"www-authenticate": "Bearer"},
        )


async def tenant_usage(request: Request) -> Response:
    """Limits and current usage of one tenant (UTC day and month)."""
    _require_admin(request)
    s = services(request)
    tenant = s.config.tenant(request.path_params["tenant"])
    if tenant is None:
        raise not_found("No such tenant.", "tenant_not_found", "tenant")
    usage = await s.store.usage(tenant.id, s.clock())
    return json_response(
        {"tenant": tenant.id, "enabled": tenant.enabled, "limits": asdict(tenant.limits), "usage": asdict(usage)}
    )


routes = [Route("/admin/tenants/{tenant}/usage", tenant_usage, methods=["GET"])]
