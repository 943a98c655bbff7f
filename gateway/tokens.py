"""Short signed tokens the gateway hands out and later gets back.

A callback URL `{public_url}/hooks/runway/{token}` names the tenant and the gateway's
request id, so a callback can be matched (or its task adopted) without trusting its body.
An asset URL token lets the upstream fetch an uploaded image until it expires. Both are
HS256 JWTs under the gateway's own secret, with a `use` claim so one kind can never stand
in for the other.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass

import jwt
import orjson

ALGORITHM = "HS256"
# PyJWT's header for HS256 (sorted keys, compact), base64url without padding
_HS256_HEADER = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=")


@dataclass(frozen=True)
class CallbackClaims:
    tenant_id: str
    rid: str


class TokenSigner:
    def __init__(self, secret: str):
        self._secret = secret
        self._mac = hmac.new(secret.encode(), digestmod=hashlib.sha256)

    def callback_token(self, tenant_id: str, rid: str) -> str:
        """Byte for byte what `jwt.encode(claims, secret, "HS256")` makes, without PyJWT's
        per-call key preparation (one token per create; docs/benchmarks.md)."""
        claims = orjson.dumps({"use": "cb", "t": tenant_id, "r": rid})
        signing_input = _HS256_HEADER + b"." + base64.urlsafe_b64encode(claims).rstrip(b"=")
        mac = self._mac.copy()
        mac.update(signing_input)
        return (signing_input + b"." + base64.urlsafe_b64encode(mac.digest()).rstrip(b"=")).decode()

    def read_callback_token(self, token: str) -> CallbackClaims | None:
        claims = self._decode(token, "cb")
        if claims is None or not isinstance(claims.get("t"), str) or not isinstance(claims.get("r"), str):
            return None
        return CallbackClaims(claims["t"], claims["r"])

    def asset_token(self, asset_id: str, expires_at: int) -> str:
        return jwt.encode({"use": "asset", "a": asset_id, "exp": expires_at}, self._secret, algorithm=ALGORITHM)

    def read_asset_token(self, token: str) -> str | None:
        claims = self._decode(token, "asset")
        asset = claims.get("a") if claims else None
        return asset if isinstance(asset, str) else None

    def _decode(self, token: str, use: str) -> dict | None:
        try:
            claims = jwt.decode(token, self._secret, algorithms=[ALGORITHM], options={"require": []})
        except jwt.PyJWTError:
            return None
        return claims if claims.get("use") == use else None
