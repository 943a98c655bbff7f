"""Short signed tokens the gateway hands out and later gets back.

A callback URL `{public_url}/hooks/runway/{token}` names the tenant and the gateway's
request id, so a callback can be matched (or its task adopted) without trusting its body.
An asset URL token lets the upstream fetch an uploaded image until it expires. Both are
HS256 JWTs under the gateway's own secret, with a `use` claim so one kind can never stand
in for the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import jwt

ALGORITHM = "HS256"


@dataclass(frozen=True)
class CallbackClaims:
    tenant_id: str
    rid: str


class TokenSigner:
    def __init__(self, secret: str):
        self._secret = secret

    def callback_token(self, tenant_id: str, rid: str) -> str:
        return jwt.encode({"use": "cb", "t": tenant_id, "r": rid}, self._secret, algorithm=ALGORITHM)

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
