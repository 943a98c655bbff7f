"""Idempotent creates: one task and one charge per tenant and key.

The first response is kept for 24 h when it is a 2xx or a 4xx other than 429; after a 429
or a 5xx that certainly created nothing upstream the key is free again. Bodies are
compared after parsing (a retried multipart request has a fresh boundary), so the caller
hands in a fingerprint, not raw bytes.

A create sent upstream without a usable answer (`OutcomeUnknown`: timeout, reset,
garbage) may have made a task, so its key stays bound to that attempt's reservation for
24 h instead: a repeat gets 409 `idempotency_outcome_unknown` until a callback or poll
identifies the task, then the task itself, rendered from its current record by the route
(`render_task`), so it is never created or charged twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from starlette.responses import Response

from gateway.errors import GatewayError, error_response
from gateway.store.base import Store, StoredResponse, TaskRecord, retry_unavailable
from gateway.tasks import OutcomeUnknown, in_flight_seconds

KEEP_SECONDS = 24 * 3600
UNKNOWN_RETRY_AFTER_SECONDS = 5  # callbacks come when the upstream's task changes state
KEY_RE = re.compile(r"^[\x21-\x7e]{1,255}$")
KEPT_HEADERS = ("content-type",)


def fingerprint(route: str, parsed: Any) -> str:
    """Canonical hash of a parsed body (sorted keys) for one route."""
    return hashlib.sha256(route.encode() + b"\0" + orjson.dumps(parsed, option=orjson.OPT_SORT_KEYS)).hexdigest()


def idempotency_key(headers: Mapping[str, str]) -> str | None:
    key = headers.get("idempotency-key")
    if key is None:
        return None
    if not KEY_RE.match(key):
        raise GatewayError(
            400,
            "invalid_idempotency_key",
            "Idempotency-Key must be 1-255 visible ASCII characters.",
            param="Idempotency-Key",
        )
    return key


async def run_idempotent(
    store: Store,
    tenant_id: str,
    key: str,
    fp: str,
    wait_seconds: float,
    on_replay: Callable[[], Awaitable[None]],
    handler: Callable[[], Awaitable[Response]],
    render_task: Callable[[TaskRecord], Response],
    clock: Callable[[], float] = time.time,
) -> Response:
    """Run `handler` once per (tenant, key); replay or refuse repeats. `on_replay` charges
    the replay as a request (requests_per_minute) and may raise its 429. `render_task` is
    the route's 200 answer for a task, for a key bound to an unknown outcome."""
    deadline = clock() + wait_seconds
    delay = 0.02
    while True:
        begun = await store.idem_begin(tenant_id, key, fp, clock(), lease=in_flight_seconds(wait_seconds))
        if begun.state == "new":
            break
        if begun.state == "conflict":
            raise GatewayError(
                409,
                "idempotency_key_reused",
                "This Idempotency-Key was used with a different request body.",
                param="Idempotency-Key",
            )
        if begun.state == "replay" and begun.response is not None:
            await on_replay()
            first = begun.response
            headers = {**first.headers, "idempotent-replayed": "true"}
            return Response(first.body, status_code=first.status, headers=headers)
        if begun.state == "unknown" and begun.rid:
            await on_replay()
            return await _replay_unknown(store, begun.rid, render_task)
        if clock() >= deadline:
            raise GatewayError(
                409,
                "idempotency_key_in_use",
                "A request with this Idempotency-Key is still in progress.",
                param="Idempotency-Key",
            )
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.25)
    try:
        response = await handler()
    except OutcomeUnknown as unknown:
        rid = unknown.rid
        await retry_unavailable(lambda: store.idem_bind(tenant_id, key, rid, clock(), KEEP_SECONDS))
        return error_response(unknown)
    except GatewayError as err:
        response = error_response(err)
    except BaseException:
        await store.idem_finish(tenant_id, key, None, clock(), KEEP_SECONDS)
        raise
    status = response.status_code
    keep = 200 <= status < 300 or (400 <= status < 500 and status != 429)
    kept = (
        StoredResponse(
            status, {h: response.headers[h] for h in KEPT_HEADERS if h in response.headers}, bytes(response.body)
        )
        if keep
        else None
    )
    # a kept reply may stand for a paid task: losing it to an outage would let a retry buy another
    await retry_unavailable(lambda: store.idem_finish(tenant_id, key, kept, clock(), KEEP_SECONDS))
    return response


async def _replay_unknown(store: Store, rid: str, render_task: Callable[[TaskRecord], Response]) -> Response:
    """The task of a key bound to an unknown outcome, as it stands now; 409 while no
    callback or poll has identified it."""
    record = await store.get_by_rid(rid)
    if record is None or not record.task_id:
        raise GatewayError(
            409,
            "idempotency_outcome_unknown",
            "The upstream did not answer the first request with this Idempotency-Key, so it is not known yet "
            "whether it created the task. Retry later: the task is returned once the upstream reports it, "
            "and never created twice.",
            param="Idempotency-Key",
            headers={"retry-after": str(UNKNOWN_RETRY_AFTER_SECONDS)},
        )
    response = render_task(record)
    response.headers["idempotent-replayed"] = "true"
    return response
