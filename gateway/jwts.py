"""JWTs from the company's IdP, verified with PyJWT against the configured algorithms only
(never `none`, never an HS* algorithm with a public key), with `exp`, `nbf`, `iss` and
`aud` checked. Its own module so that the directory (which holds the verifier of its
config) and the authenticator (which reads the directory) both import it, one way.
"""

from __future__ import annotations

from typing import Any

import jwt

from gateway.config import JWTConfig
from gateway.errors import AuthFailure

JWKS_CACHE_SECONDS = 300


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
