"""The document's operations: every client route of contract §3, §9, §10 and the ops routes,
each with its parameters, body, answers and the error codes it can give.

`Op` lists an operation's own error codes; `operation` adds what its kind of caller can
always get (a tenant's 401/403/429, an admin's 401/403, the store's 503) and, for a body,
the middleware's 408 and 413.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway import videos
from gateway.admin import ACTIONS
from gateway.openapi.errors import RETRY_AFTER, by_status, error_response
from gateway.openapi.schemas import LISTED_STATUSES, WEBHOOK_STATES, ref
from gateway.routes.admin import PAGE_MAX
from gateway.uploads import ALLOWED_TYPES

JSON = "application/json"
TENANT_ERRORS = (
    "invalid_api_key",
    "tenant_disabled",
    "permission_denied",  # a key outside its scopes or networks (contract §15)
    "rate_limit_exceeded",
    "store_unavailable",
)
ADMIN_ERRORS = ("invalid_api_key", "permission_denied", "store_unavailable")
BODY_ERRORS = ("request_too_large", "request_timeout")
UPSTREAM_ERRORS = ("upstream_error", "upstream_unavailable", "upstream_rate_limited", "upstream_timeout")
CREATE_ERRORS = (
    "invalid_idempotency_key",
    "idempotency_key_reused",
    "idempotency_key_in_use",
    "idempotency_outcome_unknown",
    "concurrency_limit_exceeded",
    "insufficient_quota",
    *UPSTREAM_ERRORS,
)
TENANT_PAGE_MAX = 100
RATE_HEADERS = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests")
_GROUP = r"\s*(day|tenant|key|relay)\s*"
GROUP_BY_PATTERN = f"^{_GROUP}(,{_GROUP})*$"  # any non-empty subset, any order, spaces allowed


def header(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/headers/{name}"}


def param(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/parameters/{name}"}


def query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def or_empty(values: list[str], default: str | None = None) -> dict[str, Any]:
    """One of `values`, or empty: these query parameters take `?x=` as not given."""
    schema: dict[str, Any] = {"type": "string", "enum": [*values, ""]}
    return {**schema, "default": default} if default else schema


def path_param(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}, "description": description}


def json_body(schema: str, required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {JSON: {"schema": ref(schema)}}}


def json_ok(schema: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": ref(schema)}}}


@dataclass
class Op:
    """One operation: who may call it, what it takes, what it answers."""

    operation_id: str
    summary: str
    tag: str
    auth: str | None  # tenant | admin | metrics | None (no credential)
    ok: dict[int, dict[str, Any]]
    errors: tuple[str, ...] = ()
    params: tuple[dict[str, Any], ...] = ()
    body: dict[str, Any] | None = None
    description: str = ""
    links: dict[str, dict[str, Any]] = field(default_factory=dict)  # on the first success answer


SECURITY: dict[str | None, list[dict[str, list[str]]]] = {
    "tenant": [{"tenantBearer": []}],
    "admin": [{"adminBearer": []}],
    "metrics": [{}, {"metricsBearer": []}],
    None: [],
}


def operation(op: Op) -> dict[str, Any]:
    errors: tuple[str, ...] = op.errors
    if op.auth == "tenant":
        errors = TENANT_ERRORS + errors
    elif op.auth == "admin":
        errors = ADMIN_ERRORS + errors
    if op.body is not None:
        errors += BODY_ERRORS
    success_headers = {"x-request-id": header("RequestId")}
    if op.auth == "tenant":
        success_headers |= {h: header(h) for h in RATE_HEADERS}
    responses: dict[str, Any] = {}
    for status, answer in op.ok.items():
        responses[str(status)] = {**answer, "headers": {**success_headers, **answer.get("headers", {})}}
    if op.links:
        first = responses[str(min(op.ok))]
        first["links"] = op.links
    for status, keys in by_status(tuple(dict.fromkeys(errors))).items():
        headers = {"x-request-id": header("RequestId")}
        if status in RETRY_AFTER:
            headers["retry-after"] = header("RetryAfter")
        responses[str(status)] = error_response(status, keys, headers)
    out: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "tags": [op.tag],
        "security": SECURITY[op.auth],
        "responses": responses,
    }
    if op.description:
        out["description"] = op.description
    if op.params:
        out["parameters"] = list(op.params)
    if op.body is not None:
        out["requestBody"] = op.body
    return out


def _link(operation_id: str, **parameters: str) -> dict[str, Any]:
    return {"operationId": operation_id, "parameters": parameters}


def _links(pointer: str, name: str, *operation_ids: str) -> dict[str, dict[str, Any]]:
    """Links from an answer to the operations that take its id (the value at `pointer`) as
    the path parameter `name`, each named after the operation it leads to."""
    return {o: _link(o, **{name: f"$response.body#{pointer}"}) for o in operation_ids}


TASK_ID = path_param("id", "The task id (the relay's), as the create answered it.")
VIDEO_ID = path_param("id", "The video id (the task id).")
TENANT_ID = path_param("id", "The tenant id.")
KEY_ID = path_param("key_id", "The key id (`key_...`).")


# --- tenant routes (§3) ------------------------------------------------------------------

NATIVE = [
    (
        "/runway/tasks",
        "post",
        Op(
            "createTask",
            "Create a gen2 task (the relay's API)",
            "native",
            "tenant",
            {200: json_ok("TaskEnvelope", "The relay's answer: the task, PENDING.")},
            (
                "invalid_json",
                "invalid_body",
                "invalid_type",
                "invalid_value",
                "unknown_parameter",
                "missing_required_parameter",
                "unsupported_task_type",
                "prompt_too_long",
                "invalid_url",
                "invalid_notify_hook",
                *CREATE_ERRORS,
            ),
            (param("IdempotencyKey"),),
            json_body("NativeCreate"),
            "Validated, put under the tenant's policy, charged against its limits, sent to the relay with the "
            "gateway's callback URL in place of `notify_hook`. Once per Idempotency-Key.",
            _links("/task/id", "id", "getTask"),
        ),
    ),
    (
        "/runway/tasks",
        "get",
        Op(
            "listTasks",
            "List the tenant's tasks, newest first",
            "native",
            "tenant",
            {200: json_ok("TaskList", "A page of tasks.")},
            ("invalid_value",),
            (
                query("status", or_empty(LISTED_STATUSES), "Only tasks in this status (empty: any)."),
                param("Limit"),
                param("After"),
            ),
        ),
    ),
    (
        "/runway/tasks/{id}",
        "get",
        Op(
            "getTask",
            "Read a task (the latest state the gateway knows)",
            "native",
            "tenant",
            {200: json_ok("TaskEnvelope", "The task.")},
            ("task_not_found",),
            (TASK_ID,),
        ),
    ),
]

VIDEO_CREATE_BODY = {
    "required": True,
    "content": {
        JSON: {"schema": ref("VideoCreate")},
        "multipart/form-data": {
            "schema": ref("VideoCreateMultipart"),
            "encoding": {"input_reference": {"contentType": ", ".join(ALLOWED_TYPES)}},
        },
        "application/x-www-form-urlencoded": {"schema": ref("VideoCreateForm")},
    },
}
VIDEO_LINKS = _links("/id", "id", "getVideo", "getVideoContent", "deleteVideo")

OPENAI = [
    (
        "/v1/models",
        "get",
        Op("listModels", "List the video models", "openai", "tenant", {200: json_ok("ModelList", "The models.")}),
    ),
    (
        "/v1/models/{id}",
        "get",
        Op(
            "getModel",
            "Read a model",
            "openai",
            "tenant",
            {200: json_ok("Model", "The model.")},
            ("model_not_found_404",),
            (path_param("id", "The model id, e.g. `gen2`."),),
        ),
    ),
    (
        "/v1/videos",
        "post",
        Op(
            "createVideo",
            "Create a video (OpenAI's Videos API)",
            "openai",
            "tenant",
            {200: json_ok("Video", "The new video, queued.")},
            (
                "invalid_json",
                "invalid_body",
                "invalid_type",
                "invalid_value",
                "unknown_parameter",
                "unsupported_parameter",
                "missing_required_parameter",
                "model_not_found",
                "prompt_too_long",
                "invalid_url",
                "invalid_multipart",
                "invalid_file",
                "file_too_large",
                "unsupported_file_type",
                "upload_not_supported",
                *CREATE_ERRORS,
            ),
            (param("IdempotencyKey"),),
            VIDEO_CREATE_BODY,
            "JSON, or a form (what the official SDKs send). An image by URL (`input_reference.image_url`, as a "
            "form field `input_reference[image_url]`) or uploaded as the file `input_reference`.",
            VIDEO_LINKS,
        ),
    ),
    (
        "/v1/videos",
        "get",
        Op(
            "listVideos",
            "List the tenant's videos",
            "openai",
            "tenant",
            {200: json_ok("VideoList", "A page of videos.")},
            ("invalid_value",),
            (
                param("After"),
                param("Limit"),
                query("order", or_empty(["asc", "desc"], "desc"), "By creation time (empty: the default)."),
            ),
        ),
    ),
    (
        "/v1/videos/{id}",
        "get",
        Op(
            "getVideo",
            "Read a video",
            "openai",
            "tenant",
            {
                200: {
                    **json_ok("Video", "The video."),
                    "headers": {"openai-poll-after-ms": header("PollAfter")},
                }
            },
            ("task_not_found",),
            (VIDEO_ID,),
        ),
    ),
    (
        "/v1/videos/{id}",
        "delete",
        Op(
            "deleteVideo",
            "Hide a video from the tenant",
            "openai",
            "tenant",
            {200: json_ok("VideoDeleted", "Deleted.")},
            ("task_not_found",),
            (VIDEO_ID,),
        ),
    ),
    (
        "/v1/videos/{id}/content",
        "get",
        Op(
            "getVideoContent",
            "Download a video's bytes (streamed through the gateway)",
            "openai",
            "tenant",
            {
                200: {
                    "description": "The artifact, with the relay's content type and length.",
                    "content": {
                        t: {"schema": {"type": "string", "contentMediaType": t}}
                        for t in ("video/mp4", "image/jpeg", "application/octet-stream")
                    },
                }
            },
            (
                "invalid_value",
                "task_not_found",
                "video_not_ready",
                "variant_not_available",
                "video_expired",
                "upstream_error",
                "upstream_unavailable",
            ),
            (
                VIDEO_ID,
                query("variant", or_empty(list(videos.VARIANTS), "video"), "Which artifact (empty: the default)."),
            ),
        ),
    ),
    (
        "/assets/{token}",
        "get",
        Op(
            "getAsset",
            "An uploaded image, for the relay (the signed token is the credential)",
            "openai",
            None,
            {
                200: {
                    "description": "The image.",
                    "content": {t: {"schema": {"type": "string", "contentMediaType": t}} for t in ALLOWED_TYPES},
                }
            },
            ("asset_not_found", "store_unavailable"),
            (path_param("token", "The signed, expiring token of the gateway's link."),),
        ),
    ),
]


# --- admin routes (§9, §10) --------------------------------------------------------------

KEY_LINKS = _links("/id", "key_id", "getKey", "updateKey", "rotateKey", "revokeKey")
TENANT_LINKS = _links("/id", "id", "getTenant", "updateTenant", "rotateWebhookSecret", "listTenantKeys", "createKey")
TENANT_NOT_FOUND = ("tenant_not_found",)
KEY_CHANGE = ("invalid_json", "invalid_body", "unknown_parameter", "invalid_value", "invalid_type")

ADMIN = [
    (
        "/admin/v1/tenants",
        "get",
        Op(
            "listTenants",
            "List tenants (config and API), by id",
            "admin",
            "admin",
            {200: json_ok("TenantList", "A page of tenants.")},
            ("invalid_value",),
            (param("AdminLimit"), param("AdminAfter")),
        ),
    ),
    (
        "/admin/v1/tenants",
        "post",
        Op(
            "createTenant",
            "Create a tenant",
            "admin",
            "admin",
            {201: json_ok("TenantWithSecret", "The tenant and its webhook secret (shown once).")},
            (*KEY_CHANGE, "missing_required_parameter", "tenant_exists"),
            body=json_body("TenantCreate"),
            links=TENANT_LINKS,
        ),
    ),
    (
        "/admin/v1/tenants/{id}",
        "get",
        Op(
            "getTenant",
            "Read a tenant and its usage",
            "admin",
            "admin",
            {200: json_ok("TenantWithUsage", "The tenant; usage: active tasks, today, this month.")},
            TENANT_NOT_FOUND,
            (TENANT_ID,),
        ),
    ),
    (
        "/admin/v1/tenants/{id}",
        "patch",
        Op(
            "updateTenant",
            "Change a tenant's name, enabled state, limits or policy",
            "admin",
            "admin",
            {200: json_ok("Tenant", "The tenant after the change.")},
            (*KEY_CHANGE, "tenant_not_found", "tenant_managed_by_config"),
            (TENANT_ID,),
            json_body("TenantUpdate", required=False),
        ),
    ),
    (
        "/admin/v1/tenants/{id}/webhook-secret",
        "post",
        Op(
            "rotateWebhookSecret",
            "Rotate a tenant's webhook secret",
            "admin",
            "admin",
            {200: json_ok("TenantWithSecret", "The tenant and its new webhook secret (shown once).")},
            (*KEY_CHANGE, "tenant_not_found", "tenant_managed_by_config"),
            (TENANT_ID,),
            json_body("Rotation", required=False),
            "For `grace_seconds` deliveries carry a `v1=` signature for each secret.",
        ),
    ),
    (
        "/admin/v1/tenants/{id}/keys",
        "get",
        Op(
            "listTenantKeys",
            "List a tenant's keys, newest first (config keys after API keys)",
            "admin",
            "admin",
            {200: json_ok("ApiKeyList", "A page of keys.")},
            ("invalid_value", "tenant_not_found"),
            (TENANT_ID, param("AdminLimit"), param("AdminAfter")),
        ),
    ),
    (
        "/admin/v1/tenants/{id}/keys",
        "post",
        Op(
            "createKey",
            "Mint an API key",
            "admin",
            "admin",
            {201: json_ok("ApiKeyWithSecret", "The key and its secret (shown once).")},
            (*KEY_CHANGE, "missing_required_parameter", "tenant_not_found"),
            (TENANT_ID,),
            json_body("KeyCreate"),
            links=KEY_LINKS,
        ),
    ),
    (
        "/admin/v1/keys/{key_id}",
        "get",
        Op(
            "getKey",
            "Read a key and its usage",
            "admin",
            "admin",
            {200: json_ok("ApiKeyWithUsage", "The key; usage: active tasks, today, this month (its own limits').")},
            ("key_not_found",),
            (KEY_ID,),
        ),
    ),
    (
        "/admin/v1/keys/{key_id}",
        "patch",
        Op(
            "updateKey",
            "Change a key's name or expiry",
            "admin",
            "admin",
            {200: json_ok("ApiKey", "The key after the change.")},
            (*KEY_CHANGE, "key_not_found", "key_managed_by_config"),
            (KEY_ID,),
            json_body("KeyUpdate", required=False),
        ),
    ),
    (
        "/admin/v1/keys/{key_id}",
        "delete",
        Op(
            "revokeKey",
            "Revoke a key (idempotent)",
            "admin",
            "admin",
            {200: json_ok("ApiKey", "The key, revoked_at set.")},
            ("key_not_found", "key_managed_by_config"),
            (KEY_ID,),
        ),
    ),
    (
        "/admin/v1/keys/{key_id}/rotate",
        "post",
        Op(
            "rotateKey",
            "Rotate a key's secret (same id)",
            "admin",
            "admin",
            {200: json_ok("ApiKeyWithSecret", "The key and its new secret (shown once).")},
            (*KEY_CHANGE, "key_not_found", "key_managed_by_config", "key_revoked"),
            (KEY_ID,),
            json_body("Rotation", required=False),
            "The old secret keeps working until `previous_secret_expires_at`.",
        ),
    ),
    (
        "/admin/v1/audit",
        "get",
        Op(
            "listAudit",
            "The audit trail, newest first",
            "admin",
            "admin",
            {200: json_ok("AuditList", "A page of audit entries.")},
            ("invalid_value",),
            (
                param("AdminLimit"),
                param("AdminAfter"),
                query("tenant", {"type": "string"}, "Only entries about this tenant or its keys."),
                query("action", {"type": "string", "enum": list(ACTIONS)}, "Only this action."),
            ),
        ),
    ),
    (
        "/admin/v1/usage",
        "get",
        Op(
            "getUsage",
            "The usage ledger: tasks and credits per day, tenant, key and relay",
            "admin",
            "admin",
            {
                200: {
                    "description": "Rows (fields not grouped by are left out); with `format=csv`, the same rows as "
                    "CSV under a header row.",
                    "content": {
                        JSON: {"schema": ref("UsageList")},
                        "text/csv": {"schema": {"type": "string"}},
                    },
                }
            },
            ("invalid_value",),
            (
                query("from", {"type": "string", "format": "date"}, "First UTC day (default: 30 days before `to`)."),
                query("to", {"type": "string", "format": "date"}, "Last UTC day, inclusive (default: today)."),
                query("tenant", {"type": "string"}, "Only this tenant."),
                query("key_id", {"type": "string"}, "Only this key."),
                query(
                    "group_by",
                    {"type": "string", "pattern": GROUP_BY_PATTERN, "default": "day,tenant"},
                    "Any subset of day, tenant, key, relay, comma-separated.",
                ),
                query("format", or_empty(["json", "csv"], "json"), "The answer's form (empty: json)."),
            ),
            description="UTC dates, inclusive, at most 366 days.",
        ),
    ),
    (
        "/admin/v1/relays",
        "get",
        Op(
            "listRelays",
            "The relays, as the answering process sees them",
            "admin",
            "admin",
            {200: json_ok("RelayList", "Every configured relay: state, priority, weight, keys' health; never a key.")},
            description="Each process keeps its own view (circuit, cooling, refused keys, failovers).",
        ),
    ),
    (
        "/admin/v1/webhooks",
        "get",
        Op(
            "listWebhookEvents",
            "Webhook deliveries, newest first",
            "admin",
            "admin",
            {200: json_ok("WebhookEventList", "A page of webhook events.")},
            ("invalid_value",),
            (
                query("status", {"type": "string", "enum": list(WEBHOOK_STATES)}, "Only events in this state."),
                query("tenant", {"type": "string"}, "Only this tenant's events."),
                param("AdminLimit"),
                param("AdminAfter"),
            ),
            links=_links("/data/0/id", "event_id", "redeliverWebhookEvent"),
        ),
    ),
    (
        "/admin/v1/webhooks/{event_id}/redeliver",
        "post",
        Op(
            "redeliverWebhookEvent",
            "Queue a dead webhook event again",
            "admin",
            "admin",
            {202: json_ok("WebhookEvent", "Queued: attempts reset, its place in its task's order kept.")},
            ("webhook_event_not_found", "webhook_event_not_dead"),
            (path_param("event_id", "The event id."),),
        ),
    ),
    (
        "/admin/tenants/{tenant}/usage",
        "get",
        Op(
            "getTenantUsage",
            "A tenant's limits and usage (the older read; see getTenant)",
            "admin",
            "admin",
            {200: json_ok("TenantUsage", "Limits, and usage this UTC day and month.")},
            TENANT_NOT_FOUND,
            (path_param("tenant", "The tenant id."),),
        ),
    ),
]


# --- operations --------------------------------------------------------------------------

OPS = [
    ("/healthz", "get", Op("healthz", "Liveness", "ops", None, {200: json_ok("Status", "The process serves.")})),
    (
        "/readyz",
        "get",
        Op(
            "readyz",
            "Readiness: the store answers",
            "ops",
            None,
            {
                200: json_ok("Readiness", "Ready; the body also reports the upstream's circuit."),
                503: json_ok("Readiness", "The store cannot answer or take writes (an OpenAI error, plus these)."),
            },
        ),
    ),
    (
        "/metrics",
        "get",
        Op(
            "metrics",
            "Prometheus metrics",
            "ops",
            "metrics",
            {
                200: {
                    "description": "Prometheus text format.",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
            ("invalid_api_key", "store_unavailable"),
            description="Open unless `[metrics] bearer_token` is set; then that token as a Bearer credential.",
        ),
    ),
    (
        "/openapi.json",
        "get",
        Op(
            "openapi",
            "This document",
            "ops",
            None,
            {200: {"description": "OpenAPI 3.1.", "content": {JSON: {"schema": {"type": "object"}}}}},
        ),
    ),
]

ROUTES = [*NATIVE, *OPENAI, *ADMIN, *OPS]


def paths() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for path, method, op in ROUTES:
        out.setdefault(path, {})[method] = operation(op)
    return out


def parameters() -> dict[str, dict[str, Any]]:
    def limit(maximum: int, default: int) -> dict[str, Any]:
        schema = {"type": "integer", "minimum": 1, "maximum": maximum, "default": default}
        return query("limit", schema, f"Page size, 1-{maximum}.")

    return {
        "Limit": limit(TENANT_PAGE_MAX, 20),
        "After": query("after", {"type": "string"}, "The last id of the previous page."),
        "AdminLimit": limit(PAGE_MAX, 100),
        "AdminAfter": query("after", {"type": "string"}, "The last id of the previous page."),
        "IdempotencyKey": {
            "name": "Idempotency-Key",
            "in": "header",
            "required": False,
            "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,255}$"},
            "description": "Once per key: a repeat with the same body replays the first answer (24 h).",
        },
    }


def headers() -> dict[str, dict[str, Any]]:
    def text(description: str, required: bool = False) -> dict[str, Any]:
        return {"description": description, "required": required, "schema": {"type": "string"}}

    return {
        "RequestId": text("The caller's x-request-id when it is a safe token, else a new one.", True),
        "x-ratelimit-limit-requests": text("The tenant's tightest request limit."),
        "x-ratelimit-remaining-requests": text("Requests left in it."),
        "x-ratelimit-reset-requests": text("When it is full again, e.g. `1s`, `6m0s`."),
        "RetryAfter": text("Whole seconds until a retry can succeed."),
        "PollAfter": text("Milliseconds until a poll can show news, while the video is not finished."),
    }
