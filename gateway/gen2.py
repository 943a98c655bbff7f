"""The relay's gen2 create body: validated, put under the tenant's policy, rewritten.

Strict by design: the documented fields with their documented types, nothing else. A
request that fails here never reaches the upstream and leaves no record. The result is the
body the upstream receives, minus the callback URL, which the caller adds once it has a
request id to sign into it.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from gateway.config import Policy
from gateway.errors import bad_request
from gateway.gen2_options import (
    GEN2_INT_RANGES,
    GEN2_OPTION_TYPES,
    MAX_PROMPT_CHARS,
    URL_FIELDS,
    https_url_problem,
)
from gateway.jsontypes import a_type_name, is_type

MAX_SEED = GEN2_INT_RANGES["seed"][1]
MIN_MOTION, MAX_MOTION = GEN2_INT_RANGES["motion_score"]
MAX_NAME_CHARS = 256
GEN2_SECONDS = 4
TOP_LEVEL: dict[str, type] = {"taskType": str, "internal": bool, "options": dict, "notify_hook": str}
OPTIONS: dict[str, type] = {
    "name": str,
    "seconds": int,
    "gen2Options": dict,
    "exploreMode": bool,
    "assetGroupName": str,
}


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
