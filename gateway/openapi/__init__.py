"""`GET /openapi.json`: an OpenAPI 3.1 description of the gateway's client API (contract §11).

Every route of §3 (native and OpenAI), §9 and §10 (admin) and the ops routes, with
request bodies, parameters, every answer and error code, and both security schemes. The
upstream's callbacks (`/hooks/runway/{token}`) are not a client API and are left out.
The document is a pure function of the code (no config in it), built once per process.
"""

from __future__ import annotations

import functools
from typing import Any

import orjson

from gateway import __version__
from gateway.openapi.paths import headers, parameters, paths
from gateway.openapi.schemas import components

OPENAPI_VERSION = "3.1.0"
TAGS = [
    {"name": "native", "description": "The relay's own API (§3.1): drop-in for its clients."},
    {"name": "openai", "description": "OpenAI's Videos API (§3.2): drop-in for the official SDKs."},
    {"name": "admin", "description": "Tenants, keys, audit trail, usage ledger and webhook deliveries (§9, §10)."},
    {"name": "ops", "description": "Liveness, readiness, metrics and this document."},
]
SECURITY_SCHEMES = {
    "tenantBearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "A tenant's API key (`sk-gw-...`), or a JWT accepted by `[auth.jwt]` naming the tenant.",
    },
    "adminBearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "An admin key (hashes in `[admin] keys`), or a JWT accepted by `[auth.jwt]` whose "
        "`[admin] jwt_claim` holds `[admin] jwt_role`.",
    },
    "metricsBearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "`[metrics] bearer_token`, when set.",
    },
}
DESCRIPTION = (
    "A key-managed, quota-enforcing gateway in front of a Runway gen2 relay. Every error, on every route, is "
    'OpenAI-shaped: `{"error": {"message", "type", "param", "code"}}`; each operation lists its codes. Every '
    "answer carries `x-request-id`; a tenant's answers carry OpenAI's `x-ratelimit-*-requests` headers."
)


def document() -> dict[str, Any]:
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "runway-gateway", "version": __version__, "description": DESCRIPTION},
        "tags": TAGS,
        "paths": paths(),
        "components": {
            "schemas": components(),
            "parameters": parameters(),
            "headers": headers(),
            "securitySchemes": SECURITY_SCHEMES,
        },
    }


@functools.cache
def document_bytes() -> bytes:
    """The document as served: built on the first request, then the same bytes (it depends
    on nothing that changes while the process runs)."""
    return orjson.dumps(document())
