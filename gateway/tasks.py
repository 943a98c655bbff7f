"""A task's life as the gateway owns it: admit, forward, record, update, settle.

Both APIs (native and OpenAI) create through `TaskService.create`; callbacks, status polls
and the timeout sweep all change a task through `TaskService.apply`, which is the store's
single compare-and-set. That is what makes charges, refunds and webhook events happen
exactly once however these race.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from gateway.config import Config, Tenant
from gateway.errors import GatewayError
from gateway.gen2 import Gen2Request
from gateway.logs import log_fields
from gateway.metrics import Metrics
from gateway.quotas import refused
from gateway.relays import Relays, RouteFailed
from gateway.relays.client import Outcome, UpstreamFailure
from gateway.store.base import (
    UNKNOWN,
    Charge,
    KeyLimits,
    RateInfo,
    Store,
    TaskRecord,
    UpdateResult,
    retry_unavailable,
)
from gateway.store.rules import day_key, month_key
from gateway.tokens import TokenSigner
from gateway.uploads import PendingUpload

logger = logging.getLogger("gateway.tasks")
TIMED_OUT_POLL_SECONDS = 3600.0
POLL_AFTER_TIMEOUT_SECONDS = 86400.0
# A create is in flight at most the relay timeout plus this (admission before the call,
# the record's write after it): the Idempotency-Key's lease, and when the sweep takes a
# reservation still SUBMITTING for one whose gateway died mid-create.
IN_FLIGHT_MARGIN_SECONDS = 5.0


@dataclass
class Created:
    """What a create gives its route: the record and the task as the tenant sees it, and
    for the request's rate headers and log line, the admission's bucket and upstream time."""

    record: TaskRecord
    task: dict[str, Any]
    rate: RateInfo | None
    upstream_ms: float
    relay: str = ""  # the relay that created it
    relay_attempts: int = 1  # how many relays the create tried


class CreateFailed(UpstreamFailure):
    """An admitted create the upstream did not accept: answered like the failure it wraps,
    and carrying what `Created` would have (the bucket, the upstream time) for the request."""

    def __init__(
        self,
        failure: UpstreamFailure,
        rate: RateInfo | None,
        upstream_ms: float,
        relay: str | None = None,
        relay_attempts: int = 0,
    ):
        super().__init__(failure.status, failure.code, failure.message, failure.outcome, failure.upstream_status)
        self.headers = dict(failure.headers)
        self.rate = rate
        self.upstream_ms = upstream_ms
        self.relay = relay
        self.relay_attempts = relay_attempts


class OutcomeUnknown(CreateFailed):
    """A create that reached the upstream without a usable answer (timeout, reset, garbage):
    the task may exist, under the reservation `rid`. An idempotent create binds its key to
    `rid`, so a retry can never buy a second task (and it never goes to another relay)."""

    def __init__(
        self,
        failure: UpstreamFailure,
        rate: RateInfo | None,
        upstream_ms: float,
        rid: str,
        relay: str | None = None,
        relay_attempts: int = 0,
    ):
        super().__init__(failure, rate, upstream_ms, relay, relay_attempts)
        self.rid = rid


class TaskService:
    def __init__(
        self,
        config: Config,
        store: Store,
        relays: Relays,
        signer: TokenSigner,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ):
        self.config = config
        self.store = store
        self.relays = relays
        self.signer = signer
        self.metrics = metrics
        self.clock = clock
        self._refreshing: dict[str, asyncio.Task[None]] = {}

    # create -------------------------------------------------------------------------
    async def create(
        self,
        tenant: Tenant,
        req: Gen2Request,
        request_id: str,
        meta: dict[str, Any] | None = None,
        upload: PendingUpload | None = None,
        key_id: str | None = None,
        idempotency_key: str | None = None,
        key: KeyLimits | None = None,
    ) -> Created:
        """admit -> rewrite -> keep the upload -> forward -> record (the caller authenticated).
        `key_id` is the caller's API key (None for a JWT): the usage ledger's row.
        `idempotency_key`, one the caller holds, is bound to the reservation at admission, so
        a crash from here on can never let a retry with that key create a second task.

        Raises the 429 of a refusal (`quotas.refused`) and `CreateFailed` (or its
        `OutcomeUnknown`) when the upstream did not accept the task. `upload`, an image the
        body links to, is stored only once the create is admitted (nothing is kept for a
        refused request) and removed when the upstream definitely created nothing. `key`,
        the limits of the caller's key when it has any, are checked in the same admission."""
        now = self.clock()
        credits = self.config.pricing.price(req.gen2_options)
        plan = self.relays.plan(tenant.policy.relays)  # in memory: no store round trip
        if not plan:
            raise no_relay(tenant.policy.relays)
        rid = new_rid(now)
        reservation = TaskRecord(
            rid=rid,
            tenant_id=tenant.id,
            relay=plan[0].id,
            key_index=plan[0].pick_key(),
            hook=req.tenant_hook,
            credits=credits,
            created_at=now,
            updated_at=now,
            next_poll_at=now + self.config.upstream.poll_interval_seconds,
            meta=meta or {},
            key_id=key_id,
        )
        charge = Charge(credits, day_key(now), month_key(now))
        admission = await self.store.admit_create(
            tenant.id, tenant.limits, charge, reservation, now, idempotency_key, key
        )
        if not admission.ok:
            raise refused(admission, tenant, self.metrics, key)
        self.metrics.count(self.metrics.credits_charged, (tenant.id,), credits)
        body = dict(req.body)
        if self.config.server.public_url:
            token = self.signer.callback_token(
                tenant.id, rid, callback_expiry(now, self.config.upstream.task_timeout_seconds)
            )
            body["notify_hook"] = f"{self.config.server.public_url}/hooks/runway/{token}"
        if upload is not None:
            await self._keep_upload(reservation, upload)
        start = time.perf_counter()

        async def switch(relay: str, key_index: int) -> None:
            """Before the create goes to another relay or key: the store records where."""
            if not await self.store.assign_relay(rid, relay, key_index, self.clock()):
                raise RuntimeError(f"reservation {rid} is no longer SUBMITTING")

        try:
            routed = await self.relays.create(body, plan, reservation.key_index, request_id, switch)
        except RouteFailed as failed:
            failure = failed.failure
            upstream_ms = (time.perf_counter() - start) * 1000
            await self._settle_failed_create(reservation, failure, upload)
            where = (failed.relay, failed.attempts)
            if failure.outcome is Outcome.UNKNOWN:
                raise OutcomeUnknown(failure, admission.rate, upstream_ms, rid, *where) from failure
            raise CreateFailed(failure, admission.rate, upstream_ms, *where) from failure
        upstream_ms = (time.perf_counter() - start) * 1000
        # the task exists and is paid for: recording it is retried through a store outage
        result = await retry_unavailable(lambda: self.apply(rid, tenant.id, routed.task))
        self.metrics.count(self.metrics.tasks_created, (tenant.id, "gen2"))
        record = result.record or reservation
        return Created(record, public_task(routed.task), admission.rate, upstream_ms, routed.relay, routed.attempts)

    async def _keep_upload(self, reservation: TaskRecord, upload: PendingUpload) -> None:
        """Store an admitted create's upload; if the store fails, nothing was sent: refund."""
        try:
            await upload.keep()
        except Exception:
            await self._refund_not_created(reservation)
            raise

    async def _settle_failed_create(
        self, reservation: TaskRecord, failure: UpstreamFailure, upload: PendingUpload | None
    ) -> None:
        """Unknown outcome: keep the charge and the upload (the relay may have the task and
        fetch the image). Definitely not created: refund and forget the upload."""
        if failure.outcome is Outcome.UNKNOWN:
            await retry_unavailable(lambda: self.store.mark_unknown(reservation.rid, self.clock()))
            log_fields(
                logger,
                logging.WARNING,
                {
                    "event": "create_outcome_unknown",
                    "rid": reservation.rid,
                    "tenant": reservation.tenant_id,
                    "code": failure.code,
                },
            )
            return
        await self._refund_not_created(reservation)
        if upload is not None:
            await upload.discard()

    async def _refund_not_created(self, reservation: TaskRecord) -> None:
        if await retry_unavailable(lambda: self.store.settle_not_created(reservation.rid, self.clock())):
            self.metrics.count(self.metrics.credits_refunded, (reservation.tenant_id,), reservation.credits)

    # updates ------------------------------------------------------------------------
    async def apply(
        self, rid: str, tenant_id: str, task: dict[str, Any], adopt: TaskRecord | None = None
    ) -> UpdateResult:
        """The one way a task changes state; records what it did in the metrics."""
        now = self.clock()
        result = await self.store.apply_update(
            rid, tenant_id, public_task(task), now, refund_failed=self.config.pricing.refund_failed, adopt=adopt
        )
        rec = result.record
        if rec is None:
            return result
        m = self.metrics
        if result.adopted:
            m.count(m.credits_charged, (rec.tenant_id,), rec.credits)
            m.count(m.tasks_created, (rec.tenant_id, rec.task_type))
        if result.finished:
            m.count(m.tasks_finished, (rec.tenant_id, rec.status))
            m.observe(m.task_duration, (rec.task_type, rec.status), max(0.0, now - rec.created_at))
        if result.refunded_credits:
            m.count(m.credits_refunded, (rec.tenant_id,), result.refunded_credits)
        return result

    async def callback(self, token: str, payload: Any) -> str:
        """A callback from the upstream; returns the metric result. Raises GatewayError."""
        claims = self.signer.read_callback_token(token)
        if claims is None:
            self.metrics.count(self.metrics.callbacks, ("bad_token",))
            raise GatewayError(
                401, "invalid_callback_token", "Unknown or forged callback token.", "authentication_error"
            )
        task = payload.get("task") if isinstance(payload, dict) else None
        if not isinstance(task, dict) or not isinstance(task.get("id"), str) or not isinstance(task.get("status"), str):
            self.metrics.count(self.metrics.callbacks, ("invalid",))
            raise GatewayError(400, "invalid_callback", 'A callback body is {"task": {"id": ..., "status": ...}}.')
        existing = await self.store.get_by_rid(claims.rid)
        if existing is not None and existing.task_id and existing.task_id != task["id"]:
            self.metrics.count(self.metrics.callbacks, ("invalid",))
            raise GatewayError(400, "invalid_callback", "The callback's task does not belong to this token.")
        self._observe_lag(task)
        adopt = None if existing else self._adoption(claims.tenant_id, claims.rid, task)
        result = await self.apply(claims.rid, claims.tenant_id, task, adopt=adopt)
        outcome = (
            "adopted"
            if result.adopted
            else "applied"
            if result.status_changed
            else "duplicate"
            if result.applied
            else "stale"
        )
        if result.record is None:
            outcome = "unknown"
        self.metrics.count(self.metrics.callbacks, (outcome,))
        return outcome

    def _adoption(self, tenant_id: str, rid: str, task: dict[str, Any]) -> TaskRecord:
        """A task the upstream created but the gateway never recorded (it died in between)."""
        now = self.clock()
        options: dict[str, Any] = task["options"] if isinstance(task.get("options"), dict) else {}
        gen2: dict[str, Any] = options["gen2Options"] if isinstance(options.get("gen2Options"), dict) else {}
        return TaskRecord(
            rid=rid,
            tenant_id=tenant_id,
            task_id=task["id"],
            credits=self.config.pricing.price(gen2),
            created_at=now,
            updated_at=now,
            next_poll_at=now,
        )

    def _observe_lag(self, task: dict[str, Any]) -> None:
        updated = task.get("updatedAt")
        if isinstance(updated, str):
            try:
                lag = self.clock() - datetime.fromisoformat(updated.replace("Z", "+00:00")).timestamp()
            except ValueError:
                return
            self.metrics.callback_lag.observe(max(0.0, lag))

    # polling ------------------------------------------------------------------------
    def refresh_soon(self, record: TaskRecord) -> None:
        """A tenant looked at a non-terminal task: poll the upstream in the background if
        this task is due. One in-flight refresh per task per process; across processes the
        store's claim lets one poll per interval."""
        if (
            record.terminal
            or not record.task_id
            or not self.relays.get(record.relay).config.status_path
            or record.next_poll_at > self.clock()
            or record.rid in self._refreshing
        ):
            return
        job = asyncio.create_task(self._refresh(record))
        self._refreshing[record.rid] = job
        job.add_done_callback(lambda _: self._refreshing.pop(record.rid, None))

    async def _refresh(self, record: TaskRecord) -> None:
        if await self.store.claim_poll(record.rid, self.clock(), self.config.upstream.poll_interval_seconds):
            await self.poll(record)

    async def poll(self, record: TaskRecord) -> None:
        """One upstream status call for a claimed task; failures wait for the next interval."""
        assert record.task_id is not None
        relay = self.relays.get(record.relay)  # the task's own relay, whatever routing does now
        if not relay.config.status_path:
            return
        try:
            task = await relay.status(record.task_id, record.key_index, f"poll_{secrets.token_hex(6)}")
        except UpstreamFailure as failure:
            log_fields(logger, logging.INFO, {"event": "poll_failed", "task_id": record.task_id, "code": failure.code})
            return
        if task is not None and task.get("id") == record.task_id:
            await self.apply(record.rid, record.tenant_id, task)

    async def poll_due(self, limit: int = 50) -> int:
        cfg = self.config.upstream
        if not any(relay.status_path for relay in self.config.relay_list):
            return 0
        due = await self.store.claim_due_polls(
            self.clock(),
            cfg.poll_interval_seconds,
            limit,
            TIMED_OUT_POLL_SECONDS,
            cfg.task_timeout_seconds + POLL_AFTER_TIMEOUT_SECONDS,
        )
        await asyncio.gather(*(self.poll(r) for r in due))
        return len(due)

    async def expire(self) -> int:
        """Free the slots of tasks past task_timeout_seconds and of creates whose outcome
        stayed unknown past unknown_outcome_timeout_seconds; their charges stand. A
        reservation still unanswered past the longest a create may wait on relays
        (`Config.create_seconds`: every relay it may fail over to) plus
        IN_FLIGHT_MARGIN_SECONDS lost its gateway mid-create: its outcome is unknown too
        (docs/lifecycle.md)."""
        cfg = self.config.upstream
        expired = await self.store.expire_tasks(
            self.clock(),
            cfg.task_timeout_seconds,
            cfg.unknown_outcome_timeout_seconds,
            in_flight=in_flight_seconds(self.config.create_seconds),
        )
        for rec in expired:
            fields: dict[str, Any]
            if rec.active:  # only marked UNKNOWN: its gateway died before an answer was recorded
                fields = {
                    "event": "create_outcome_unknown",
                    "rid": rec.rid,
                    "tenant": rec.tenant_id,
                    "code": "gateway_lost_mid_create",
                }
            elif rec.status == UNKNOWN:
                fields = {
                    "event": "create_outcome_unknown_expired",
                    "tenant": rec.tenant_id,
                    "rid": rec.rid,
                    "credits": rec.credits,
                }
            else:
                fields = {"event": "task_timed_out", "tenant": rec.tenant_id, "task_id": rec.task_id, "rid": rec.rid}
            log_fields(logger, logging.WARNING, fields)
        return len(expired)


def in_flight_seconds(timeout_seconds: float) -> float:
    """The longest a live gateway holds a create: the relay timeout plus a margin."""
    return timeout_seconds + IN_FLIGHT_MARGIN_SECONDS


def no_relay(allowed: tuple[str, ...]) -> UpstreamFailure:
    """Every relay the tenant may use is drained (`enabled = false`): nothing is admitted."""
    which = f" ({', '.join(allowed)})" if allowed else ""
    return UpstreamFailure(
        503,
        "upstream_unavailable",
        f"No relay this tenant may use{which} takes new tasks now.",
        Outcome.NOT_SENT,
        headers={"retry-after": "60"},
    )


def callback_expiry(created_at: float, task_timeout_seconds: float) -> int:
    """When a task's callback token stops working: as long as the gateway still polls the
    task (`task_timeout_seconds`, then hourly for a day), so no legitimate late callback is lost."""
    return math.ceil(created_at + task_timeout_seconds + POLL_AFTER_TIMEOUT_SECONDS)


def new_rid(now: float) -> str:
    """A reservation id that sorts by creation time (milliseconds, then 80 random bits): new
    ones append to the store's rid index instead of landing on a random page of it, which
    keeps a SQLite group commit to a few dirty pages (docs/benchmarks.md)."""
    return f"gwr_{int(now * 1000):012x}{secrets.token_hex(10)}"


def public_task(task: dict[str, Any]) -> dict[str, Any]:
    """The upstream's task object as a tenant may see it: without the gateway's callback URL."""
    if "notify_hook" not in task and "notify_hook" not in (task.get("options") or {}):
        return task
    clean = {k: v for k, v in task.items() if k != "notify_hook"}
    if isinstance(clean.get("options"), dict):
        clean["options"] = {k: v for k, v in clean["options"].items() if k != "notify_hook"}
    return clean
