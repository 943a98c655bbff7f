"""The gateway's own signed tokens: callback tokens expire (`task_timeout_seconds` plus a
day after creation), and an expired or tampered token reads as no token. A fake clock,
no servers; tests/test_native.py checks the same through a running gateway."""

from __future__ import annotations

import base64

import jwt
import orjson

from gateway.tasks import callback_expiry
from gateway.tokens import CallbackClaims, TokenSigner

SECRET = "s" * 48


class Clock:
    def __init__(self, now: float = 1_800_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def claims_of(token: str) -> dict:
    return orjson.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))


def test_callback_token_works_until_its_expiry() -> None:
    clock = Clock()
    signer = TokenSigner(SECRET, clock)
    expires = callback_expiry(clock.now, 3600)
    assert expires == clock.now + 3600 + 86400
    token = signer.callback_token("team-a", "gwr_1", expires)
    assert claims_of(token) == {"use": "cb", "t": "team-a", "r": "gwr_1", "exp": expires}
    assert token == jwt.encode(claims_of(token), SECRET, algorithm="HS256")  # a standard HS256 JWT
    assert signer.read_callback_token(token) == CallbackClaims("team-a", "gwr_1")
    clock.now = expires - 1
    assert signer.read_callback_token(token) == CallbackClaims("team-a", "gwr_1")
    clock.now = expires
    assert signer.read_callback_token(token) is None


def test_expiry_is_signed_and_required() -> None:
    clock = Clock()
    signer = TokenSigner(SECRET, clock)
    token = signer.callback_token("team-a", "gwr_1", int(clock.now) + 10)
    header, _, signature = token.split(".")
    later = base64.urlsafe_b64encode(orjson.dumps({**claims_of(token), "exp": int(clock.now) + 10**6})).rstrip(b"=").decode()
    assert signer.read_callback_token(f"{header}.{later}.{signature}") is None  # a moved expiry breaks the signature
    forever = jwt.encode({"use": "cb", "t": "team-a", "r": "gwr_1"}, SECRET, algorithm="HS256")
    assert signer.read_callback_token(forever) is None  # no expiry, no entry
    assert TokenSigner("another secret " * 3, clock).read_callback_token(token) is None


def test_asset_and_callback_tokens_do_not_stand_in_for_each_other() -> None:
    clock = Clock()
    signer = TokenSigner(SECRET, clock)
    asset = signer.asset_token("asset_1", int(clock.now) + 60)
    assert signer.read_asset_token(asset) == "asset_1" and signer.read_callback_token(asset) is None
    assert signer.read_asset_token(signer.callback_token("t", "r", int(clock.now) + 60)) is None
    clock.now += 60
    assert signer.read_asset_token(asset) is None
