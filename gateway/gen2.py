"""The relay's gen2 create body: validated, put under the tenant's policy, rewritten.

Strict by design: the documented fields with their documented types, nothing else. A
request that fails here never reaches the upstream and leaves no record. The result is the
body the upstream receives, minus the callback URL, which the caller adds once it has a
request id to sign into it.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from gateway.config import GEN2_INT_RANGES, GEN2_OPTION_TYPES, Policy
from gateway.errors import bad_request
from gateway.jsontypes import a_type_name, is_type

MAX_SEED = GEN2_INT_RANGES["seed"][1]
MIN_MOTION, MAX_MOTION = GEN2_INT_RANGES["motion_score"]
MAX_PROMPT_CHARS = 2000
MAX_NAME_CHARS = 256
MAX_URL_CHARS = 4096
GEN2_SECONDS = 4
TOP_LEVEL: dict[str, type] = {"taskType": str, "internal": bool, "options": dict, "notify_hook": str}
OPTIONS: dict[str, type] = {
    "name": str,
    "seconds": int,
    "gen2Options": dict,
    "exploreMode": bool,
    "assetGroupName": str,
}
URL_FIELDS = ("image_prompt", "init_image")
HOST_LABEL_RE = re.compile(r"^[A-Za-z0-9_-]{1,63}\Z")


@dataclass
class Gen2Request:
    body: dict[str, Any]  # what the upstream gets (notify_hook added later)
    tenant_hook: str  # the tenant's own notify_hook, "" when none

    @property
    def gen2_options(self) -> dict[str, Any]:
        options: dict[str, Any] = self.body["options"]["gen2Options"]
        return options


def validate_native(body: Any, policy: Policy) -> Gen2Request:
    """Validate a relay-shaped body and apply the tenant's policy (raises GatewayError 400)."""
    if not isinstance(body, dict):
        raise bad_request("invalid_body", "The request body must be a JSON object.")
    _check_fields(body, TOP_LEVEL, "")
    task_type = body.get("taskType")
    if task_type is None:
        raise bad_request("missing_required_parameter", "`taskType` is required.", "taskType")
    if task_type != "gen2":
        raise bad_request("unsupported_task_type", "Only taskType `gen2` is supported.", "taskType")
    options = body.get("options")
    if options is None:
        raise bad_request("missing_required_parameter", "`options` is required.", "options")
    _check_fields(options, OPTIONS, "options")
    gen2 = options.get("gen2Options")
    if gen2 is None:
        raise bad_request("missing_required_parameter", "`options.gen2Options` is required.", "options.gen2Options")
    _check_fields(gen2, GEN2_OPTION_TYPES, "options.gen2Options")
    if "seconds" in options and options["seconds"] != GEN2_SECONDS:
        raise bad_request("invalid_value", f"gen2 makes {GEN2_SECONDS}-second clips only.", "options.seconds")
    if len(options.get("name", "")) > MAX_NAME_CHARS:
        raise bad_request(
            "invalid_value", f"`options.name` is longer than {MAX_NAME_CHARS} characters.", "options.name"
        )
    rewritten = dict(options)
    rewritten["gen2Options"] = apply_policy(check_gen2_options(gen2), policy)
    fill_defaults(rewritten)
    upstream = {"taskType": "gen2", "internal": body.get("internal", False), "options": rewritten}
    return Gen2Request(upstream, body.get("notify_hook", "") or "")


def check_gen2_options(gen2: dict[str, Any], prefix: str = "options.gen2Options") -> dict[str, Any]:
    """Value checks shared by both APIs; drops empty image URLs (the relay wants them omitted)."""
    out = dict(gen2)
    if out.get("mode", "gen2") != "gen2":
        raise bad_request("invalid_value", "`mode` must be `gen2`.", f"{prefix}.mode")
    seed = out.get("seed")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise bad_request("invalid_value", f"`seed` must be between 0 and {MAX_SEED}.", f"{prefix}.seed")
    motion = out.get("motion_score")
    if motion is not None and not MIN_MOTION <= motion <= MAX_MOTION:
        raise bad_request(
            "invalid_value", f"`motion_score` must be between {MIN_MOTION} and {MAX_MOTION}.", f"{prefix}.motion_score"
        )
    if len(out.get("text_prompt", "")) > MAX_PROMPT_CHARS:
        raise bad_request(
            "prompt_too_long", f"The prompt is longer than {MAX_PROMPT_CHARS} characters.", f"{prefix}.text_prompt"
        )
    for name in URL_FIELDS:
        if name in out and out[name] == "":
            del out[name]
        elif name in out:
            problem = https_url_problem(out[name])
            if problem:
                raise bad_request("invalid_url", f"`{name}` {problem}.", f"{prefix}.{name}")
    if not out.get("text_prompt") and not out.get("image_prompt"):
        raise bad_request(
            "missing_required_parameter", "Give a `text_prompt`, an `image_prompt`, or both.", f"{prefix}.text_prompt"
        )
    return out


def option_value_problem(name: str, value: Any) -> str | None:
    """What is wrong with one gen2Options value of the right type, worded for a policy's
    `force` or `defaults` (the create checks above say the same of a tenant's own)."""
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


def apply_policy(gen2: dict[str, Any], policy: Policy) -> dict[str, Any]:
    return {**policy.defaults, **gen2, **policy.force}


def fill_defaults(options: dict[str, Any]) -> None:
    """A random seed when none was sent, and the relay's usual name."""
    gen2 = options["gen2Options"]
    gen2.setdefault("mode", "gen2")
    if gen2.get("seed") is None:
        gen2["seed"] = secrets.randbelow(MAX_SEED + 1)
    if not options.get("name"):
        options["name"] = f"Gen-2 {gen2['seed']}"


def https_url_problem(value: str) -> str | None:
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


def _check_fields(obj: Any, spec: dict[str, type], prefix: str) -> None:
    if not isinstance(obj, dict):
        raise bad_request("invalid_type", f"`{prefix}` must be an object.", prefix or None)
    for key, value in obj.items():
        path = f"{prefix}.{key}" if prefix else key
        expected = spec.get(key)
        if expected is None:
            raise bad_request("unknown_parameter", f"Unknown parameter `{path}`.", path)
        if not is_type(value, expected):
            raise bad_request("invalid_type", f"`{path}` must be {a_type_name(expected)}.", path)
