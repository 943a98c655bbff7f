"""Who is calling: a tenant's API key or a JWT from the company's IdP.

Keys are looked up by their SHA-256 in the in-memory directory (`gateway.directory`, kept
fresh by a background worker: no store round trip per request): hashing first means the
lookup never compares secret bytes, so its timing leaks nothing about stored keys. A key's
expiry and rotation grace are checked against the clock here, on every request. JWTs
are verified by `gateway.jwts` (the directory holds the verifier of the config it was
built with).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from gateway.config import Tenant
from gateway.directory import Directory, KeyEntry
from gateway.errors import AuthFailure, GatewayError
from gateway.jwts import JWTVerifier


@dataclass(frozen=True)
class Principal:
    tenant: Tenant
    method: str  # "key" | "jwt"
    key_id: str | None = None  # the API key's id (None for a JWT)
    key: KeyEntry | None = None  # the API key's entry: its own limits, scopes and networks (§15)


def key_hash(key: str) -> str:
    """The config form of an API key: `sha256:<64 hex>`."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def bearer_credential(authorization: str | None) -> str | None:
    """The credential of an `Authorization: Bearer <credential>` header (the scheme in any
    case), or None for a missing header or any other shape. The one parser: tenant keys,
    JWTs, admin keys and the metrics token are all read through it."""
    scheme, _, credential = (authorization or "").partition(" ")
    credential = credential.strip()
    if scheme.lower() != "bearer" or not credential:
        return None
    return credential


class Authenticator:
    """Reads the current directory once per request (`directory()`), so a refresh or a
    config reload swapping it mid-request never mixes two views."""

    def __init__(self, directory: Callable[[], Directory], clock: Callable[[], float]):
        self._directory = directory
        self._clock = clock

    def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise AuthFailure("missing", "Missing bearer credential: send `Authorization: Bearer <api key>`.")
        credential = bearer_credential(authorization)
        if credential is None:
            raise AuthFailure("malformed", "Malformed Authorization header: expected `Bearer <api key>`.")
        directory = self._directory()
        entry = directory.key(key_hash(credential), self._clock())
        if entry is not None:
            principal = Principal(directory.tenants[entry.tenant_id], "key", entry.key_id, entry)
        elif directory.jwt is not None and credential.count(".") == 2:
            principal = Principal(self._tenant_from_jwt(directory, directory.jwt, credential), "jwt")
        else:
            raise AuthFailure("unknown_key", "Incorrect API key provided.")
        if not principal.tenant.enabled:
            raise GatewayError(403, "tenant_disabled", "This tenant is disabled.", "permission_error")
        return principal

    @staticmethod
    def _tenant_from_jwt(directory: Directory, verifier: JWTVerifier, token: str) -> Tenant:
        claims = verifier.verify(token)
        tenant_id = claims.get(verifier.config.tenant_claim)
        tenant = directory.tenants.get(tenant_id) if isinstance(tenant_id, str) else None
        if tenant is None:
            raise AuthFailure("unknown_tenant", "The token does not name a known tenant.")
        return tenant
