"""The gateway's own signed tokens (gateway/tokens.py): callback tokens expire
(`task_timeout_seconds` plus a day after creation), an expired, tampered, forged or
garbled token reads as no token, and one kind never stands in for the other. A fake clock,
no servers; tests/test_native.py checks the same through a running gateway."""

from __future__ import annotations

import base64
import time

import jwt
import orjson
import pytest

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
    later = (
        base64.urlsafe_b64encode(orjson.dumps({**claims_of(token), "exp": int(clock.now) + 10**6}))
        .rstrip(b"=")
        .decode()
    )
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


def forge(claims: dict, secret: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, secret, algorithm=algorithm)


def test_a_tampered_asset_token_reads_as_none() -> None:
    clock = Clock()
    signer = TokenSigner(SECRET, clock)
    token = signer.asset_token("asset_1", int(clock.now) + 60)
    header, _, signature = token.split(".")
    other = base64.urlsafe_b64encode(orjson.dumps({**claims_of(token), "a": "asset_2"})).rstrip(b"=").decode()
    assert signer.read_asset_token(f"{header}.{other}.{signature}") is None  # another asset, same signature
    assert signer.read_asset_token(token[:-2] + ("AA" if token[-2:] != "AA" else "BB")) is None  # a changed signature
    assert TokenSigner("another secret " * 3, clock).read_asset_token(token) is None


@pytest.mark.parametrize("token", ["", "not-a-token", "a.b.c", "a.b", "....", "\u00e9.\u00e9.\u00e9"])
def test_garbage_reads_as_none(token: str) -> None:
    signer = TokenSigner(SECRET, Clock())
    assert signer.read_callback_token(token) is None and signer.read_asset_token(token) is None


def test_only_hs256_under_the_gateways_secret_is_accepted() -> None:
    clock = Clock()
    signer = TokenSigner(SECRET, clock)
    claims = {"use": "asset", "a": "asset_1", "exp": int(clock.now) + 60}
    assert signer.read_asset_token(forge(claims)) == "asset_1"
    assert signer.read_asset_token(forge(claims, algorithm="HS384")) is None  # the algorithm is pinned
    unsigned = jwt.encode(claims, None, algorithm="none")
    assert signer.read_asset_token(unsigned) is None


@pytest.mark.parametrize(
    "claims",
    [
        {"t": "team-a", "r": "gwr_1"},  # no use
        {"use": "asset", "t": "team-a", "r": "gwr_1"},  # the other kind
        {"use": "CB", "t": "team-a", "r": "gwr_1"},  # a kind is matched exactly
        {"use": "cb", "t": 7, "r": "gwr_1"},  # claims of the wrong type
        {"use": "cb", "t": "team-a", "r": ["gwr_1"]},
        {"use": "cb", "t": "team-a"},  # a claim missing
        {"use": "cb", "t": "team-a", "r": "gwr_1", "exp": True},  # exp must be an integer
        {"use": "cb", "t": "team-a", "r": "gwr_1", "exp": "9999999999"},
    ],
)
def test_a_callback_token_needs_its_kind_and_claims(claims: dict) -> None:
    clock = Clock()
    signer = TokenSigner(SECRET, clock)
    token = forge({"exp": int(clock.now) + 60, **claims})
    assert signer.read_callback_token(token) is None


@pytest.mark.parametrize("asset", [7, None, ["asset_1"]])
def test_an_asset_token_needs_a_string_asset(asset: object) -> None:
    clock = Clock()
    signer = TokenSigner(SECRET, clock)
    assert signer.read_asset_token(forge({"use": "asset", "a": asset, "exp": int(clock.now) + 60})) is None


def test_expiry_follows_the_signers_clock_not_the_wall_clock() -> None:
    """exp is checked against the injected clock: a token the wall clock calls expired is
    valid at the signer's time, and the reverse."""
    past = Clock(1_000_000_000.0)  # 2001
    signer = TokenSigner(SECRET, past)
    token = signer.asset_token("asset_1", int(past.now) + 60)
    assert signer.read_asset_token(token) == "asset_1"
    future = Clock(4_000_000_000.0)
    later = TokenSigner(SECRET, future)
    assert later.read_asset_token(later.asset_token("asset_2", int(time.time()) + 3600)) is None
