"""Every error code the gateway answers with, its status and what it means, and the
document's error responses built from them (one example per code, OpenAI's shape).

tests/test_openapi.py finds the codes each route's code raises and checks that the
route's operation lists them, so a new code cannot go undocumented.
"""

from __future__ import annotations

from typing import Any

from gateway.errors import GatewayError

# code -> (status, error type when not the status's default, when)
ERRORS: dict[str, tuple[int, str, str]] = {
    "invalid_json": (400, "", "The body is not valid JSON."),
    "invalid_body": (400, "", "The body is not a JSON object."),
    "invalid_type": (400, "", "A field has the wrong type (`param` names it)."),
    "invalid_value": (400, "", "A value is out of range or not one of the allowed ones (`param` names it)."),
    "unknown_parameter": (400, "", "A field the route does not take (`param` names it)."),
    "unsupported_parameter": (400, "", "A field OpenAI has that the gateway does not support."),
    "missing_required_parameter": (400, "", "A required field is missing (`param` names it)."),
    "unsupported_task_type": (400, "", "A taskType other than gen2."),
    "prompt_too_long": (400, "", "The prompt is longer than 2000 characters."),
    "invalid_url": (400, "", "An image URL that is not https://, too long, or with credentials."),
    "invalid_notify_hook": (400, "", "notify_hook is refused by the SSRF rules or the tenant's hook_hosts."),
    "invalid_idempotency_key": (400, "", "Idempotency-Key is not 1-255 visible ASCII characters."),
    "model_not_found": (400, "", "An unknown model."),
    "invalid_multipart": (400, "", "A form body that cannot be parsed."),
    "invalid_file": (400, "", "An uploaded file that is empty or not the image it claims to be."),
    "file_too_large": (400, "", "An uploaded image over the size limit."),
    "unsupported_file_type": (400, "", "An uploaded file that is not JPEG, PNG or WebP."),
    "upload_not_supported": (400, "", "An upload while the gateway has no public_url to serve it to the relay."),
    "invalid_api_key": (401, "", "Missing, malformed, unknown, revoked or expired credential."),
    "tenant_disabled": (403, "", "The tenant is disabled."),
    "permission_denied": (
        403,
        "",
        "A valid credential that may not do this: a tenant's on an admin route, or a key outside its"
        " scopes or allowed networks.",
    ),
    "task_not_found": (404, "", "No such task or video for this tenant (another tenant's id included)."),
    "model_not_found_404": (404, "", "No such model."),
    "video_not_ready": (404, "", "The video is not completed yet."),
    "variant_not_available": (404, "", "The task has no artifact of that variant."),
    "video_expired": (404, "", "The relay no longer serves the artifact (its link expired)."),
    "asset_not_found": (404, "", "Unknown or expired asset link."),
    "tenant_not_found": (404, "", "No such tenant."),
    "key_not_found": (404, "", "No such key."),
    "webhook_event_not_found": (404, "", "No such webhook event."),
    "request_timeout": (408, "invalid_request_error", "The body did not arrive in time."),
    "idempotency_key_reused": (409, "", "The Idempotency-Key was used with another body."),
    "idempotency_key_in_use": (409, "", "A request with this Idempotency-Key is still running."),
    "idempotency_outcome_unknown": (409, "", "The first request's outcome is not known yet (retry-after)."),
    "tenant_exists": (409, "", "A tenant with this id exists."),
    "tenant_managed_by_config": (409, "", "The tenant is defined in the config file: change it there."),
    "key_managed_by_config": (409, "", "The key is listed in the config file: change it there."),
    "key_revoked": (409, "", "The key is revoked: mint a new one."),
    "webhook_event_not_dead": (409, "", "Only a dead event can be redelivered."),
    "request_too_large": (413, "", "The body is over max_body_bytes."),
    "rate_limit_exceeded": (
        429,
        "",
        "requests_per_minute or tasks_per_minute reached, or any of the key's own limits (retry-after).",
    ),
    "concurrency_limit_exceeded": (429, "", "max_active_tasks reached."),
    "insufficient_quota": (429, "insufficient_quota", "A day or month budget of tasks or credits is spent."),
    "upstream_error": (502, "", "The relay answered with an error or garbage."),
    "upstream_unavailable": (503, "", "The relay cannot be reached, or its circuit is open."),
    "upstream_rate_limited": (503, "", "The relay answered 429 (retry-after)."),
    "store_unavailable": (503, "", "The store (SQLite, Redis) cannot answer or take writes (retry-after)."),
    "upstream_timeout": (504, "", "The relay did not answer within timeout_seconds."),
}
# codes whose table key differs from the code itself (one code, two statuses)
ALIASES = {"model_not_found_404": "model_not_found"}
STATUS_TEXT = {
    400: "Bad request",
    401: "Not authenticated",
    403: "Not allowed",
    404: "Not found",
    408: "Body too slow",
    409: "Conflict",
    413: "Body too large",
    429: "Limit reached",
    502: "Upstream error",
    503: "Unavailable",
    504: "Upstream timeout",
}
# statuses whose answers carry retry-after
RETRY_AFTER = (409, 429, 503)


def code_of(key: str) -> str:
    return ALIASES.get(key, key)


def error_type(key: str) -> str:
    status, kind, _ = ERRORS[key]
    return kind or GatewayError(status, key, key).type  # the type the gateway gives that status


def by_status(keys: tuple[str, ...]) -> dict[int, list[str]]:
    grouped: dict[int, list[str]] = {}
    for key in keys:
        grouped.setdefault(ERRORS[key][0], []).append(key)
    return dict(sorted(grouped.items()))


def error_response(status: int, keys: list[str], headers: dict[str, Any]) -> dict[str, Any]:
    """One status's documented answer: the Error schema, one example per code."""
    lines = "\n".join(f"- `{code_of(k)}`: {ERRORS[k][2]}" for k in keys)
    examples = {
        code_of(k): {
            "summary": ERRORS[k][2],
            "value": {"error": {"message": ERRORS[k][2], "type": error_type(k), "param": None, "code": code_of(k)}},
        }
        for k in keys
    }
    return {
        "description": f"{STATUS_TEXT[status]}. `error.code` is one of:\n\n{lines}",
        "headers": headers,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}, "examples": examples}},
    }
