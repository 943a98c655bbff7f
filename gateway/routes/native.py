"""The relay's own routes, so existing clients switch by changing base URL and key."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.errors import bad_request, not_found
from gateway.gen2 import validate_native
from gateway.routes.common import (
    authenticate,
    create_once,
    json_response,
    own_task,
    page_limit,
    parsed_or_raw,
    read_json,
    services,
    submit_task,
    tenant_request,
)
from gateway.store.base import STATUS_RANK, TaskRecord

LISTABLE_STATUSES = {s for s in STATUS_RANK if s not in ("SUBMITTING",)}


async def create_task(request: Request) -> Response:
    s = services(request)
    principal = authenticate(request, "create")
    raw = await request.body()

    async def create() -> Response:
        """Validate, then create: inside the idempotent run, so a kept 400 replays."""
        req = s.validate_hook(
            validate_native(await read_json(request), principal.tenant.policy), principal.tenant, "notify_hook"
        )
        created = await submit_task(request, principal, req)
        return json_response({"task": created.task})

    return await create_once(request, principal, "/runway/tasks", lambda: parsed_or_raw(raw), create, task_response)


async def get_task(request: Request) -> Response:
    record = await own_task(request, request.path_params["id"])
    if record is None:
        raise not_found()
    services(request).tasks.refresh_soon(record)
    return task_response(record)


def task_response(record: TaskRecord) -> Response:
    """A task as the relay shows it: `{"task": {...}}`."""
    return json_response({"task": record.task})


async def list_tasks(request: Request) -> Response:
    s = services(request)
    principal = await tenant_request(request, "read")
    status = request.query_params.get("status") or None
    if status is not None and status not in LISTABLE_STATUSES:
        raise bad_request("invalid_value", "Unknown `status`.", "status")
    limit = page_limit(request)
    records, has_more = await s.store.list_tasks(
        principal.tenant.id, limit=limit, after=request.query_params.get("after") or None, status=status
    )
    return json_response(
        {"data": [r.task for r in records], "has_more": has_more, "last_id": records[-1].task_id if records else None}
    )


routes = [
    Route("/runway/tasks", create_task, methods=["POST"]),
    Route("/runway/tasks", list_tasks, methods=["GET"]),
    Route("/runway/tasks/{id}", get_task, methods=["GET"]),
]
