"""The relay's own routes, so existing clients switch by changing base URL and key."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.errors import bad_request, not_found
from gateway.gen2 import validate_native
from gateway.idempotency import fingerprint, idempotency_key, run_idempotent
from gateway.routes.common import admit_request, authenticate, gateway, json_response, own_task, page_limit, parsed_or_raw, read_json, tenant_request
from gateway.store.base import STATUS_RANK, TaskRecord

LISTABLE_STATUSES = {s for s in STATUS_RANK if s not in ("SUBMITTING",)}


async def create_task(request: Request) -> Response:
    gw = gateway(request)
    principal = authenticate(request)

    async def create() -> Response:
        body = await read_json(request)
        req = gw.validate_hook(validate_native(body, principal.tenant.policy), principal.tenant, "notify_hook")
        created = await gw.tasks.create(principal, req, request.scope["state"])
        return json_response({"task": created.task})

    key = idempotency_key(request.headers)
    if key is None:
        return await create()
    return await run_idempotent(
        gw.store, principal.tenant.id, key, fingerprint("/runway/tasks", await parsed_or_raw(request)),
        gw.config.upstream.timeout_seconds, lambda: admit_request(request, principal), create, task_response, gw.clock,
    )


async def get_task(request: Request) -> Response:
    record = await own_task(request, request.path_params["id"])
    if record is None:
        raise not_found()
    gateway(request).tasks.refresh_soon(record)
    return task_response(record)


def task_response(record: TaskRecord) -> Response:
    """A task as the relay shows it: `{"task": {...}}`."""
    return json_response({"task": record.task})


async def list_tasks(request: Request) -> Response:
    gw = gateway(request)
    principal = await tenant_request(request)
    status = request.query_params.get("status") or None
    if status is not None and status not in LISTABLE_STATUSES:
        raise bad_request("invalid_value", "Unknown `status`.", "status")
    limit = page_limit(request)
    records, has_more = await gw.store.list_tasks(principal.tenant.id, limit=limit, after=request.query_params.get("after") or None, status=status)
    return json_response({"data": [r.task for r in records], "has_more": has_more, "last_id": records[-1].task_id if records else None})


routes = [
    Route("/runway/tasks", create_task, methods=["POST"]),
    Route("/runway/tasks", list_tasks, methods=["GET"]),
    Route("/runway/tasks/{id}", get_task, methods=["GET"]),
]
