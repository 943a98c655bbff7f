"""Fresh secrets and the ids that name them, shared by `runway-gateway new-key`, the demo
and the admin API (which mints keys and webhook secrets)."""

from __future__ import annotations

import secrets

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
KEY_PREFIX = "sk-gw-"


def new_key(prefix: str = KEY_PREFIX) -> str:
    """43 base62 characters: ~256 bits from the OS's CSPRNG."""
    return prefix + "".join(secrets.choice(BASE62) for _ in range(43))


def new_webhook_secret() -> str:
    """A tenant's webhook signing secret: 256 bits, URL-safe."""
    return "whsec_" + secrets.token_urlsafe(32)


def new_key_id() -> str:
    """An API key's id: random, so it says nothing about the secret."""
    return "key_" + secrets.token_hex(12)


def admin_actor_id(configured_hash: str) -> str:
    """The audit trail's name for an admin key (`[admin] keys` entry `sha256:<hex>`)."""
    return "adm_" + configured_hash.removeprefix("sha256:")[:12]


def new_audit_id(now: float) -> str:
    """`aud_` + milliseconds in hex (fixed width) + randomness: ids sort by time."""
    return f"aud_{int(now * 1000):012x}{secrets.token_hex(6)}"
