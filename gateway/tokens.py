"""Short signed tokens the gateway hands out and later gets back.

A callback URL `{public_url}/hooks/runway/{token}` names the tenant and the gateway's
request id, so a callback can be matched (or its task adopted) without trusting its body.
An asset URL token lets the upstream fetch an uploaded image until it expires. Both are
HS256 JWTs under the gateway's own secret, with a `use` claim so one kind can never stand
in for the other, and an `exp` claim inside the signed content: a leaked callback URL
works until `task_timeout_seconds` plus a day after its task's creation (a task is polled
that long, so a late callback is still welcome), an asset URL for `upload_ttl_seconds`.
An expired token reads as no token at all.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
    def __init__(self, secret: str, clock: Callable[[], float] = time.time):
        self._secret = secret
        self._mac = hmac.new(secret.encode(), digestmod=hashlib.sha256)
        self._clock = clock

    def callback_token(self, tenant_id: str, rid: str, expires_at: int) -> str:
        """Byte for byte what `jwt.encode(claims, secret, "HS256")` makes, without PyJWT's
        per-call key preparation (one token per create; docs/benchmarks.md)."""
        claims = orjson.dumps({"use": "cb", "t": tenant_id, "r": rid, "exp": expires_at})
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

    def _decode(self, token: str, use: str) -> dict[str, Any] | None:
        """The claims of a genuine, unexpired token of this use, else None. `exp` is required
        and checked here against the signer's clock (PyJWT would use the wall clock)."""
        try:
            claims = jwt.decode(
                token, self._secret, algorithms=[ALGORITHM], options={"require": ["exp"], "verify_exp": False}
            )
        except jwt.PyJWTError:
            return None
        exp = claims.get("exp")
        if claims.get("use") != use or not isinstance(exp, int) or isinstance(exp, bool) or exp <= self._clock():
            return None
        return claims
