"""The document's component schemas, built from the definitions the routes validate with.

Request bodies come from the same tables and bounds the checks use (`gen2.TOP_LEVEL`,
`OPTIONS`, `GEN2_OPTION_TYPES`, `MAX_SEED`, `videos.CREATE_FIELDS`, `GEN2_KNOBS`, `MODELS`,
`admin.MAX_LIMIT`, `MAX_SECONDS`, `ACTIONS`, ...), so a changed bound changes the document.
Where a check is code rather than a table (which fields an admin body takes),
tests/test_openapi.py sends each documented field to the check and an undocumented one.

Every integer a client sends has a `maximum` the gateway enforces (4xx above it). Nulls are
explicit (`["integer", "null"]`): config tenants and keys have no `created_at`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gateway import gen2, videos
from gateway.admin import ACTIONS, MAX_CIDRS, MAX_LIMIT, MAX_NAME, MAX_SECONDS, NAME_INVISIBLE, NAME_REFUSED
from gateway.gen2_options import GEN2_INT_RANGES, GEN2_OPTION_TYPES, MAX_PROMPT_CHARS, MAX_URL_CHARS, URL_FIELDS
from gateway.store.base import ALL_LIMITS, SCOPES, STATUS_RANK, Usage
from gateway.uploads import ALLOWED_TYPES

Schema = dict[str, Any]

TENANT_ID_PATTERN = "^[a-z0-9-]{1,64}$"
WEBHOOK_STATES = ("pending", "dead")  # an event the outbox still holds (§10)
LATEST_TIME = 253402300799  # 9999-12-31T23:59:59Z: the documented bound of a Unix time sent
LISTED_STATUSES = sorted(s for s in STATUS_RANK if s != "SUBMITTING")
_TYPES: dict[type, Schema] = {
    str: {"type": "string"},
    int: {"type": "integer"},
    bool: {"type": "boolean"},
    dict: {"type": "object"},
}


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    """The schema, or null (OpenAPI 3.1: a type list)."""
    return {**schema, "type": [schema["type"], "null"]}


def integer(minimum: int, maximum: int, description: str = "") -> Schema:
    schema: Schema = {"type": "integer", "minimum": minimum, "maximum": maximum}
    return {**schema, "description": description} if description else schema


def obj(properties: dict[str, Schema], required: tuple[str, ...] = (), *, closed: bool = True, **extra: Any) -> Schema:
    """An object; `closed` (no other fields) is how the gateway's checks treat every body."""
    schema: Schema = {"type": "object", "properties": properties, **extra}
    if required:
        schema["required"] = list(required)
    if closed:
        schema["additionalProperties"] = False
    return schema


def _typed(spec: dict[str, type], overrides: dict[str, Schema]) -> dict[str, Schema]:
    """Each field of a type table as its JSON type, refined by `overrides`."""
    return {name: overrides.get(name, dict(_TYPES[kind])) for name, kind in spec.items()}


# --- request bodies --------------------------------------------------------------------


def _gen2_value(name: str) -> Schema:
    """One gen2Options field as the create checks bound it."""
    if name in GEN2_INT_RANGES:
        low, high = GEN2_INT_RANGES[name]
        return integer(low, high)
    if name == "mode":
        return {"type": "string", "enum": ["gen2"]}
    if name == "text_prompt":
        return {"type": "string", "maxLength": MAX_PROMPT_CHARS}
    if name in URL_FIELDS:
        return {
            "type": "string",
            "maxLength": MAX_URL_CHARS,
            "pattern": "^$|^https://",
            "description": "An https:// URL without credentials; an empty string is dropped.",
        }
    return dict(_TYPES[GEN2_OPTION_TYPES[name]])


def gen2_options() -> Schema:
    fields = {name: _gen2_value(name) for name in GEN2_OPTION_TYPES}
    return obj(
        fields,
        anyOf=[_non_empty("text_prompt"), _non_empty("image_prompt")],
        description="The generation parameters. A `text_prompt`, an `image_prompt`, or both; a missing `seed` is "
        "filled at random. The tenant's policy sets its `force` fields and fills its `defaults`.",
    )


def _non_empty(name: str) -> Schema:
    """`name` is there and not empty (one way to meet "a prompt or an image")."""
    return {"required": [name], "properties": {name: {"minLength": 1}}}


def gen2_policy_fields() -> Schema:
    """`force` / `defaults` of a policy: gen2Options fields under the create's bounds
    (`config.parse_policy` checks them with `gen2_options.option_value_problem`)."""
    return obj({name: _gen2_value(name) for name in GEN2_OPTION_TYPES})


def native_create() -> Schema:
    options = _typed(
        gen2.OPTIONS,
        {
            "name": {"type": "string", "maxLength": gen2.MAX_NAME_CHARS},
            "seconds": integer(gen2.GEN2_SECONDS, gen2.GEN2_SECONDS, "gen2 makes 4-second clips only."),
            "gen2Options": ref("Gen2Options"),
        },
    )
    top = _typed(
        gen2.TOP_LEVEL,
        {
            "taskType": {"type": "string", "enum": ["gen2"]},
            "options": obj(options, ("gen2Options",)),
            "notify_hook": {
                "type": "string",
                "pattern": "^$|^https?://",
                "description": "The tenant's callback URL: http(s), within its `hook_hosts` when set (§5). "
                "Status changes are POSTed to it, signed with the tenant's webhook secret.",
            },
        },
    )
    return obj(top, ("taskType", "options"), description="The relay's create body, validated strictly.")


def _knobs() -> dict[str, Schema]:
    return {name: _gen2_value(field) for name, (field, _) in videos.GEN2_KNOBS.items()}


IMAGE_URL: Schema = {"type": "string", "pattern": "^(https://|data:image/)"}
# an empty prompt only with an image
PROMPT_OR_IMAGE = [{"properties": {"prompt": {"pattern": "\\S"}}}, {"required": ["input_reference"]}]


def _video_fields() -> dict[str, Schema]:
    models = list(videos.MODELS)
    sizes = sorted({s for m in videos.MODELS.values() for s in m.sizes})
    seconds = sorted({s for m in videos.MODELS.values() for s in m.seconds})
    fields = _typed(
        videos.CREATE_FIELDS,
        {
            "prompt": {"type": "string", "maxLength": MAX_PROMPT_CHARS},
            "model": {"type": "string", "enum": models, "default": videos.DEFAULT_MODEL},
            "seconds": {
                "type": ["string", "integer"],
                "enum": [*seconds, *(int(s) for s in seconds)],
                "minimum": min(int(s) for s in seconds),
                "maximum": max(int(s) for s in seconds),
                "description": "A string, as OpenAI has it; JSON may send the number.",
            },
            "size": {"type": "string", "enum": sizes},
            "input_reference": obj(
                {"image_url": IMAGE_URL},
                ("image_url",),
                description="An https:// image URL, or a `data:image/...;base64,` URL (kept by the gateway).",
            ),
        },
    )
    return {**fields, **_knobs()}


def video_create_json() -> Schema:
    return obj(
        _video_fields(),
        ("prompt",),
        anyOf=PROMPT_OR_IMAGE,
        description="OpenAI's create-video params, plus gen2 knobs.",
    )


def video_create_form(*, files: bool) -> Schema:
    """The same params as form fields (what the official SDK sends): an uploaded image as the
    file `input_reference` (multipart only), or its URL as `input_reference[image_url]`."""
    fields = {k: v for k, v in _video_fields().items() if k != "input_reference"}
    fields["input_reference[image_url]"] = IMAGE_URL
    if files:
        fields["input_reference"] = {
            "type": "string",
            "contentMediaType": "application/octet-stream",
            "description": f"An image ({', '.join(ALLOWED_TYPES)}); kept only once the create is admitted.",
        }
    either = [*PROMPT_OR_IMAGE, {"required": ["input_reference[image_url]"]}]
    return obj(fields, ("prompt",), anyOf=either if files else either[::2])


def _limits(*, write: bool) -> Schema:
    each = nullable(integer(1, MAX_LIMIT))
    if write:
        each["description"] = "A positive integer, or null for none (on PATCH: null removes the limit)."
    return obj({name: each for name in ALL_LIMITS}, () if write else ALL_LIMITS)


RELAY_IDS: Schema = {
    "type": "array",
    "items": {"type": "string", "pattern": "^[a-z0-9-]{1,32}$"},
    "description": "The configured relays this tenant's new tasks may go to (§14); absent or empty: every relay.",
}


def policy() -> Schema:
    return obj(
        {
            "force": gen2_policy_fields(),
            "defaults": gen2_policy_fields(),
            "hook_hosts": {
                "type": "array",
                "items": {"type": "string", "minLength": 1},
                "description": "Where notify_hook may point: host names, `*.suffix` wildcards, IP addresses, CIDRs.",
            },
            "relays": RELAY_IDS,
        },
        description="gen2Options fields forced or defaulted on every create, the hosts its hooks may use, and "
        "the relays its tasks may go to.",
    )


NAME: Schema = {  # admin.check_name: nothing refused, and one visible character
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_NAME,
    "pattern": f"^[^{NAME_REFUSED}]*[^\\s{NAME_REFUSED}{NAME_INVISIBLE}][^{NAME_REFUSED}]*$",
}
GRACE = integer(0, MAX_SECONDS, "Seconds the previous secret keeps working; 0 = none.")


def tenant_create() -> Schema:
    return obj(
        {
            "id": {"type": "string", "pattern": TENANT_ID_PATTERN},
            "name": NAME,
            "enabled": {"type": "boolean", "default": True},
            "limits": _limits(write=True),
            "policy": ref("Policy"),
        },
        ("id",),
    )


def tenant_update() -> Schema:
    return obj({"name": NAME, "enabled": {"type": "boolean"}, "limits": _limits(write=True), "policy": ref("Policy")})


def _expires_at() -> Schema:
    return nullable(integer(0, LATEST_TIME, "A future Unix time in seconds, at most a century away; null = never."))


def _key_access(*, write: bool) -> dict[str, Schema]:
    """A key's own limits, scopes and networks (contract §15)."""
    scopes = {"type": "array", "items": {"type": "string", "enum": list(SCOPES)}, "minItems": 1}
    cidrs = {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": MAX_CIDRS}
    if write:
        return {
            "limits": _limits(write=True),
            "scopes": {**nullable(scopes), "description": "What the key may do; null = all (create, read, delete)."},
            "allowed_cidrs": {**nullable(cidrs), "description": "Client networks it works from; null = anywhere."},
        }
    return {
        "limits": _limits(write=False),
        "scopes": {**scopes, "description": "What the key may do (all three unless restricted)."},
        "allowed_cidrs": {**nullable(cidrs), "description": "Client networks it works from; null = anywhere."},
    }


def key_create() -> Schema:
    return obj(
        {
            "name": NAME,
            "expires_at": _expires_at(),
            "expires_in_seconds": nullable(integer(1, MAX_SECONDS, "Instead of expires_at: a lifetime in seconds.")),
            **_key_access(write=True),
        },
        ("name",),
    )


def key_update() -> Schema:
    return obj({"name": NAME, "expires_at": _expires_at(), **_key_access(write=True)})


def rotation() -> Schema:
    """`{grace_seconds?}`; no body, `{}` or `null` take the default."""
    return {**obj({"grace_seconds": {**GRACE, "default": 86400}}), "type": ["object", "null"]}


# --- responses -------------------------------------------------------------------------

TIME = {"type": "integer", "description": "Unix seconds."}
OPT_TIME = nullable(TIME)
STR = {"type": "string"}
OPT_STR = nullable(STR)


def error() -> Schema:
    return obj(
        {
            "error": obj(
                {
                    "message": STR,
                    "type": STR,
                    "param": {"type": ["string", "null"], "description": "The field at fault, as a dotted path."},
                    "code": STR,
                },
                ("message", "type", "param", "code"),
                closed=False,
            )
        },
        ("error",),
        closed=False,
        description="Every error, on every route (OpenAI's shape).",
    )


def task() -> Schema:
    """The relay's task object as the gateway last learned it (its fields are the relay's)."""
    return obj(
        {
            "id": STR,
            "name": OPT_STR,
            "status": {"type": "string", "description": "PENDING, THROTTLED, RUNNING, SUCCEEDED, FAILED, CANCELLED."},
            "taskType": STR,
            "createdAt": OPT_STR,
            "updatedAt": OPT_STR,
            "options": {"type": ["object", "null"]},
            "progressRatio": {"type": ["number", "string", "null"]},
            "error": {"type": ["string", "object", "null"]},
            "artifacts": {"type": ["array", "null"], "items": {"type": ["string", "object"]}},
        },
        ("id",),
        closed=False,
    )


def task_list() -> Schema:
    return obj(
        {"data": {"type": "array", "items": ref("Task")}, "has_more": {"type": "boolean"}, "last_id": OPT_STR},
        ("data", "has_more", "last_id"),
    )


def model() -> Schema:
    return obj(
        {
            "id": STR,
            "object": {"const": "model"},
            "created": TIME,
            "owned_by": STR,
            "sizes": {"type": "array", "items": STR},
            "default_size": STR,
            "seconds": {"type": "array", "items": STR},
        },
        ("id", "object", "created", "owned_by"),
    )


def video() -> Schema:
    return obj(
        {
            "id": STR,
            "object": {"const": "video"},
            "created_at": TIME,
            "model": STR,
            "status": {"type": "string", "enum": ["queued", "in_progress", "completed", "failed"]},
            "progress": integer(0, 100),
            "seconds": STR,
            "size": STR,
            "prompt": OPT_STR,
            "error": nullable(obj({"code": STR, "message": STR}, ("code", "message"))),
            "completed_at": OPT_TIME,
            "expires_at": OPT_TIME,
            "remixed_from_video_id": OPT_STR,
        },
        ("id", "object", "created_at", "model", "status", "progress", "seconds", "size", "error"),
    )


def openai_list(item: str) -> Schema:
    return obj(
        {
            "object": {"const": "list"},
            "data": {"type": "array", "items": ref(item)},
            "first_id": OPT_STR,
            "last_id": OPT_STR,
            "has_more": {"type": "boolean"},
        },
        ("object", "data", "first_id", "last_id", "has_more"),
    )


def admin_list(item: str) -> Schema:
    return obj(
        {"object": {"const": "list"}, "data": {"type": "array", "items": ref(item)}, "has_more": {"type": "boolean"}},
        ("object", "data", "has_more"),
    )


def video_deleted() -> Schema:
    return obj(
        {"id": STR, "object": {"const": "video.deleted"}, "deleted": {"const": True}}, ("id", "object", "deleted")
    )


def usage() -> Schema:
    """The quota counters now, field for field the store's `Usage`."""
    names = tuple(f.name for f in dataclasses.fields(Usage))
    return obj({name: {"type": "integer"} for name in names}, names)


TENANT_FIELDS = ("object", "id", "name", "enabled", "source", "limits", "policy", "created_at", "updated_at")


def _tenant_properties() -> dict[str, Schema]:
    return {
        "object": {"const": "tenant"},
        "id": STR,
        "name": STR,
        "enabled": {"type": "boolean"},
        "source": {"type": "string", "enum": ["config", "api"]},
        "limits": _limits(write=False),
        "policy": obj(
            {
                "force": {"type": "object"},
                "defaults": {"type": "object"},
                "hook_hosts": {"type": "array", "items": STR},
                "relays": RELAY_IDS,
            },
            ("force", "defaults", "hook_hosts"),
        ),
        "created_at": OPT_TIME,
        "updated_at": OPT_TIME,
    }


def tenant(*extra: str) -> Schema:
    """A tenant, with `webhook_secret` (shown once) or `usage` when named."""
    properties = _tenant_properties()
    if "webhook_secret" in extra:
        properties["webhook_secret"] = {"type": "string", "description": "Shown once, in this answer only."}
    if "usage" in extra:
        properties["usage"] = ref("Usage")
    return obj(properties, (*TENANT_FIELDS, *extra))


KEY_FIELDS = (
    "object",
    "id",
    "tenant",
    "name",
    "prefix",
    "source",
    "created_at",
    "expires_at",
    "last_used_at",
    "revoked_at",
    "previous_secret_expires_at",
    "limits",
    "scopes",
    "allowed_cidrs",
)


def api_key(*extra: str) -> Schema:
    """An API key, never its hash; with `secret` (shown once) after a mint or a rotation."""
    properties: dict[str, Schema] = {
        "object": {"const": "api_key"},
        "id": STR,
        "tenant": STR,
        "name": OPT_STR,
        "prefix": {"type": ["string", "null"], "description": "The first 10 characters; null for a config key."},
        "source": {"type": "string", "enum": ["config", "api"]},
        **{f: OPT_TIME for f in KEY_FIELDS[6:11]},
        **_key_access(write=False),
    }
    if "secret" in extra:
        properties["secret"] = {"type": "string", "description": "Shown once, in this answer only."}
    if "usage" in extra:
        properties["usage"] = ref("Usage")
    return obj(properties, (*KEY_FIELDS, *extra))


def audit_event() -> Schema:
    return obj(
        {
            "object": {"const": "audit_event"},
            "id": STR,
            "time": TIME,
            "actor": obj(
                {"type": {"type": "string", "enum": ["admin_key", "jwt", "config"]}, "id": OPT_STR}, ("type", "id")
            ),
            "action": {"type": "string", "enum": list(ACTIONS)},
            "target": obj({"tenant": STR, "key_id": STR}),
            "changes": {"type": "object"},
            "request_id": OPT_STR,
            "ip": OPT_STR,
        },
        ("object", "id", "time", "actor", "action", "target", "changes", "request_id", "ip"),
    )


def old_usage() -> Schema:
    return obj(
        {"tenant": STR, "enabled": {"type": "boolean"}, "limits": _limits(write=False), "usage": ref("Usage")},
        ("tenant", "enabled", "limits", "usage"),
    )


USAGE_COUNTS = ("tasks_created", "tasks_succeeded", "tasks_failed", "credits_charged", "credits_refunded")


def usage_row() -> Schema:
    """One ledger row (§10); the fields not grouped by are left out."""
    return obj(
        {
            "date": {"type": "string", "format": "date"},
            "tenant": STR,
            "key_id": {"type": ["string", "null"], "description": "null for requests authenticated by JWT."},
            "relay": {"type": "string", "description": "The relay that created the tasks (§14)."},
            **{c: {"type": "integer"} for c in USAGE_COUNTS},
        },
        USAGE_COUNTS,
    )


def usage_list() -> Schema:
    return obj(
        {
            "object": {"const": "list"},
            "data": {"type": "array", "items": ref("UsageRow")},
            "has_more": {"type": "boolean"},
        },
        ("object", "data"),
        closed=False,
    )


RELAY_STATES = ("closed", "open", "half_open", "cooling")
RELAY_FIELDS = ("object", "id", "host", "priority", "weight", "enabled", "state", "until", "keys", "last_error")


def relay() -> Schema:
    """One relay as the answering process sees it (§14); never a key."""
    return obj(
        {
            "object": {"const": "relay"},
            "id": STR,
            "host": STR,
            "priority": {"type": "integer"},
            "weight": {"type": "integer", "minimum": 1, "maximum": 1000},
            "enabled": {"type": "boolean", "description": "false: drained, takes no new task, serves its own."},
            "state": {"type": "string", "enum": list(RELAY_STATES)},
            "until": {
                "type": ["integer", "null"],
                "description": "UNIX time an open circuit gets its probe, or a 429's cooling ends.",
            },
            "keys": obj({"total": {"type": "integer"}, "refused": {"type": "integer"}}, ("total", "refused")),
            "last_error": OPT_STR,
            "failovers": {"type": "integer", "description": "Creates that left this relay for the next one."},
        },
        (*RELAY_FIELDS, "failovers"),
    )


def relay_list() -> Schema:
    return obj({"object": {"const": "list"}, "data": {"type": "array", "items": ref("Relay")}}, ("object", "data"))


def webhook_event() -> Schema:
    return obj(
        {
            "object": {"const": "webhook_event"},
            "id": STR,
            "tenant": STR,
            "task_id": OPT_STR,
            "status": {"type": "string", "enum": list(WEBHOOK_STATES)},
            "attempts": {"type": "integer", "minimum": 0},
            "next_attempt_at": OPT_TIME,
            "last_error": OPT_STR,
            "created_at": TIME,
        },
        ("object", "id", "tenant", "task_id", "status", "attempts", "next_attempt_at", "last_error", "created_at"),
    )


def readiness() -> Schema:
    circuit = {"type": "string", "enum": ["closed", "open", "half_open"]}
    return obj(
        {
            "status": {"type": "string", "enum": ["ok", "unavailable"]},
            "store": {"type": "string", "enum": ["ok", "unavailable"]},
            "upstream_circuit": circuit,
            "upstream_auth": STR,
            "upstream_auth_failing_keys": {"type": "array", "items": {"type": "integer"}},
            "error": ref("Error"),
        },
        ("status", "store", "upstream_circuit"),
        closed=False,
    )


def components() -> dict[str, Schema]:
    return {
        "Error": error(),
        "Gen2Options": gen2_options(),
        "NativeCreate": native_create(),
        "Task": task(),
        "TaskEnvelope": obj({"task": ref("Task")}, ("task",)),
        "TaskList": task_list(),
        "Model": model(),
        "ModelList": obj(
            {"object": {"const": "list"}, "data": {"type": "array", "items": ref("Model")}}, ("object", "data")
        ),
        "VideoCreate": video_create_json(),
        "VideoCreateMultipart": video_create_form(files=True),
        "VideoCreateForm": video_create_form(files=False),
        "Video": video(),
        "VideoList": openai_list("Video"),
        "VideoDeleted": video_deleted(),
        "Policy": policy(),
        "TenantCreate": tenant_create(),
        "TenantUpdate": tenant_update(),
        "Tenant": tenant(),
        "TenantWithSecret": tenant("webhook_secret"),
        "TenantWithUsage": tenant("usage"),
        "TenantList": admin_list("Tenant"),
        "Usage": usage(),
        "TenantUsage": old_usage(),
        "KeyCreate": key_create(),
        "KeyUpdate": key_update(),
        "Rotation": rotation(),
        "ApiKey": api_key(),
        "ApiKeyWithSecret": api_key("secret"),
        "ApiKeyWithUsage": api_key("usage"),
        "ApiKeyList": admin_list("ApiKey"),
        "AuditEvent": audit_event(),
        "AuditList": admin_list("AuditEvent"),
        "UsageRow": usage_row(),
        "Relay": relay(),
        "RelayList": relay_list(),
        "UsageList": usage_list(),
        "WebhookEvent": webhook_event(),
        "WebhookEventList": admin_list("WebhookEvent"),
        "Status": obj({"status": {"const": "ok"}}, ("status",)),
        "Readiness": readiness(),
    }
