"""Who is calling: a tenant's API key or a JWT from the company's IdP.

Keys are looked up by their SHA-256 in the in-memory directory (`gateway.directory`, kept
fresh by a background worker: no store round trip per request): hashing first means the
lookup never compares secret bytes, so its timing leaks nothing about stored keys. A key's
expiry and rotation grace are checked against the clock here, on every request. JWTs
are verified with PyJWT against the configured algorithms only (never `none`, never an
HS* algorithm with a public key), with `exp`, `nbf`, `iss` and `aud` checked.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt

from gateway.config import JWTConfig, Tenant
from gateway.directory import Directory, KeyEntry
from gateway.errors import GatewayError

JWKS_CACHE_SECONDS = 300


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


class AuthFailure(GatewayError):
    """A 401 that also says why (the metric label), never echoing the credential."""

    def __init__(self, reason: str, message: str):
        super().__init__(401, "invalid_api_key", message, "invalid_request_error", None, {"www-authenticate": "Bearer"})
        self.reason = reason


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


def jwt_verifier(config: JWTConfig | None) -> JWTVerifier | None:
    """The verifier of `[auth.jwt]`, None without one (reads a public key file now)."""
    return JWTVerifier(config) if config else None


class JWTVerifier:
    def __init__(self, config: JWTConfig):
        self.config = config
        self._key: Any = None
        self._jwks: jwt.PyJWKClient | None = None
        if config.secret:
            self._key = config.secret
        elif config.public_key_file:
            with open(config.public_key_file, "rb") as f:
                self._key = f.read()
        elif config.jwks_url:
            self._jwks = jwt.PyJWKClient(config.jwks_url, cache_jwk_set=True, lifespan=JWKS_CACHE_SECONDS, timeout=5)
        required = ["exp"] + (["iss"] if config.issuer else []) + (["aud"] if config.audience else [])
        self._options: dict[str, Any] = {"require": required, "verify_signature": True}

    def verify(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
            if header.get("alg") not in self.config.algorithms:
                raise AuthFailure("jwt_algorithm", "Token signed with an algorithm this gateway does not accept.")
            key = self._jwks.get_signing_key_from_jwt(token).key if self._jwks else self._key
            return jwt.decode(
                token,
                key,
                algorithms=list(self.config.algorithms),
                audience=self.config.audience or None,
                issuer=self.config.issuer or None,
                leeway=self.config.leeway_seconds,
                options=self._options,  # type: ignore[arg-type]
            )
        except AuthFailure:
            raise
        except jwt.ExpiredSignatureError:
            raise AuthFailure("jwt_expired", "The token has expired.") from None
        except jwt.InvalidAudienceError:
            raise AuthFailure("jwt_audience", "The token is not meant for this gateway (audience).") from None
        except jwt.InvalidIssuerError:
            raise AuthFailure("jwt_issuer", "The token's issuer is not trusted.") from None
        except (jwt.PyJWTError, ValueError, TypeError):
            raise AuthFailure("jwt_invalid", "The token could not be verified.") from None
