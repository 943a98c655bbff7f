"""The gen2Options fields: their types, bounds and value checks, shared by the create
checks (`gateway.gen2`) and the tenant policies the config and the admin API accept
(`gateway.config`), so both import this and neither the other.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any
from urllib.parse import urlsplit

MAX_PROMPT_CHARS = 2000
MAX_URL_CHARS = 4096
URL_FIELDS = ("image_prompt", "init_image")
HOST_LABEL_RE = re.compile(r"^[A-Za-z0-9_-]{1,63}\Z")
GEN2_OPTION_TYPES: dict[str, type] = {
    "mode": str,
    "seed": int,
    "interpolate": bool,
    "upscale": bool,
    "watermark": bool,
    "motion_score": int,
    "use_motion_score": bool,
    "use_motion_vectors": bool,
    "text_prompt": str,
    "image_prompt": str,
    "init_image": str,
}
# gen2Options integers and their bounds (inclusive): checked on creates and in policies alike
GEN2_INT_RANGES: dict[str, tuple[int, int]] = {"seed": (0, 4_294_967_295), "motion_score": (0, 100)}


def option_value_problem(name: str, value: Any) -> str | None:
    """What is wrong with one gen2Options value of the right type, worded for a policy's
    `force` or `defaults` (the create checks in `gateway.gen2` say the same of a tenant's own)."""
    if name in GEN2_INT_RANGES:
        low, high = GEN2_INT_RANGES[name]
        return None if low <= value <= high else f"must be between {low} and {high}"
    if name == "mode" and value != "gen2":
        return 'must be "gen2"'
    if name == "text_prompt" and len(value) > MAX_PROMPT_CHARS:
        return f"must be at most {MAX_PROMPT_CHARS} characters"
    if name in URL_FIELDS and value:
        return https_url_problem(value)
    return None


def https_url_problem(value: str) -> str | None:
    """What is wrong with an image URL the relay is to fetch, or None."""
    if len(value) > MAX_URL_CHARS:
        return f"is longer than {MAX_URL_CHARS} characters"
    try:
        parts = urlsplit(value)
        host = parts.hostname
    except ValueError:
        return "is not a valid URL"
    if parts.scheme != "https" or not host:
        return "must be an https:// URL"
    try:
        port = parts.port  # raises for a port that is not a number up to 65535
    except ValueError:
        port = 0
    if port == 0:
        return "has an invalid port (1-65535)"
    if parts.username or parts.password:
        return "must not contain credentials"
    if any(ch.isspace() or not ch.isprintable() for ch in value):
        return "must not contain spaces or control characters"
    if not _valid_host(host):
        return "has an invalid host name"
    return None


def _valid_host(host: str) -> bool:
    """An IP address, or a DNS name (IDNA allowed) of letters, digits, `-` and `_`: what
    the relay can fetch (anything else it refuses, and the tenant would get a 502)."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        return False
    labels = ascii_host.rstrip(".").split(".")
    return len(ascii_host) <= 253 and all(HOST_LABEL_RE.match(label) for label in labels)
