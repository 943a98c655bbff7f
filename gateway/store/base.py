"""The store interface: a few coarse, atomic operations that say what the gateway means.

Every method is one unit of atomicity: SQLite does each in one `BEGIN IMMEDIATE`
transaction, Redis in one Lua script. Nothing above this layer does read-then-write, so
limits hold and each task settles exactly once however many workers and replicas race.

Times are UNIX seconds (float) passed in by the caller, so tests can move the clock.
"""

from __future__ import annotations

import abc
import asyncio
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})
REFUNDABLE = frozenset({"FAILED", "CANCELLED"})
# Internal states before the upstream answered. SUBMITTING: admitted and charged, upstream
# not answered yet. UNKNOWN: the upstream call failed after sending (timeout, reset,
# garbage); the charge stands, and a callback may still identify the task. An UNKNOWN
# reservation frees its slot after `unknown_outcome_timeout_seconds` (expire_tasks).
SUBMITTING = "SUBMITTING"
UNKNOWN = "UNKNOWN"
STATUS_RANK = {
    SUBMITTING: 0, UNKNOWN: 0, "PENDING": 1, "THROTTLED": 2, "RUNNING": 3, "SUCCEEDED": 4, "FAILED": 4, "CANCELLED": 4,
}  # fmt: skip

# Limit names, in the order they are checked (the first failing one is reported).
RATE_LIMITS = ("requests_per_minute", "tasks_per_minute")
ALL_LIMITS = (
    "requests_per_minute",
    "tasks_per_minute",
    "max_active_tasks",
    "tasks_per_day",
    "credits_per_day",
    "credits_per_month",
)


@dataclass(frozen=True)
class Limits:
    """A tenant's limits; None means unlimited. The store's input, so it lives here (the
    store layer imports nothing from gateway.config); config re-exports it. The fields
    are ALL_LIMITS, in that order."""

    requests_per_minute: int | None = None
    tasks_per_minute: int | None = None
    max_active_tasks: int | None = None
    tasks_per_day: int | None = None
    credits_per_day: int | None = None
    credits_per_month: int | None = None

    def has_any(self) -> bool:
        """Whether any limit is set (a key without limits costs admission nothing extra)."""
        return any(getattr(self, name) is not None for name in ALL_LIMITS)


KEY_LIMIT = "key_"  # prefix of a key limit's name in an Admission and the metric's label
SCOPES = ("create", "read", "delete")


@dataclass(frozen=True)
class KeyLimits:
    """An API key's own limits (contract §15), checked with its tenant's in the same atomic
    step. Only a key with at least one limit has one: the others pass None and cost no work."""

    key_id: str
    limits: Limits


class StoreUnavailable(Exception):
    """The store cannot answer or take writes right now: SQLite locked past its wait, a
    disk I/O error or a file it cannot open; Redis unreachable, silent past its timeout, or
    answering READONLY/LOADING/MASTERDOWN during a failover. Both stores raise this one
    error (the Redis client's connection error is a subclass), and the app answers it 503
    `store_unavailable`. Anything else a store raises is a bug and stays a 500."""


# How long an Idempotency-Key whose holder vanished after admission stays bound to its
# reservation, from the end of its lease (the contract's 24 h of an unknown outcome).
ORPHAN_KEEP_SECONDS = 86400.0

T = TypeVar("T")
RECORD_RETRY_SECONDS = 10.0  # how long a write recording paid work is retried during an outage


async def retry_unavailable(write: Callable[[], Awaitable[T]], seconds: float = RECORD_RETRY_SECONDS) -> T:
    """Run an idempotent store write again while the store is unavailable, for up to
    `seconds`, then let StoreUnavailable through. Only for writes that record what already
    happened and was paid for (the upstream created the task; the create's reply is kept):
    giving up would answer 503 for a task the tenant was charged for, and a retry would buy
    a second one. A Redis failover fails the first try (READONLY drops the connection) and
    the next one reconnects, to the new primary once the name points at it. Never for an
    admission: a charge whose reply was lost may have happened, so it is not repeated."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    delay = 0.02
    while True:
        try:
            return await write()
        except StoreUnavailable:
            if loop.time() + delay > deadline:
                raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.5)


def status_rank(status: str) -> int:
    """Order of states; unknown upstream states rank with RUNNING (in progress, not final)."""
    return STATUS_RANK.get(status, 3)


@dataclass
class RateInfo:
    """What the x-ratelimit-*-requests headers say about one token bucket."""

    limit: int
    remaining: int
    reset_seconds: float  # until the bucket is full again


@dataclass
class Admission:
    ok: bool
    limit: str | None = None  # the limit that refused: one of ALL_LIMITS, or KEY_LIMIT + one for a key's
    retry_after: float = 0.0  # seconds until a retry can succeed
    rate: RateInfo | None = None  # the tightest bucket this request drew from

    @property
    def code(self) -> str:
        if self.limit in RATE_LIMITS or (self.limit or "").startswith(KEY_LIMIT):  # §15: every key limit
            return "rate_limit_exceeded"
        if self.limit == "max_active_tasks":
            return "concurrency_limit_exceeded"
        return "insufficient_quota"


@dataclass
class TaskRecord:
    """One task as the gateway owns it. `rid` is the gateway's request id (the key the
    callback token names); `task_id` is the upstream's id, what tenants see."""

    rid: str
    tenant_id: str
    status: str = SUBMITTING
    task_id: str | None = None
    key_index: int = 0
    task: dict[str, Any] = field(default_factory=dict)  # latest upstream task object
    hook: str = ""  # the tenant's own notify_hook ("" = none)
    task_type: str = "gen2"
    credits: int = 0  # charged at admission
    charge_day: str = ""
    charge_month: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0
    active: bool = True  # counts toward max_active_tasks
    settled: bool = False  # the charge is final (kept or refunded), never touched again
    timed_out: bool = False
    deleted: bool = False  # hidden from the tenant (DELETE /v1/videos/{id})
    next_poll_at: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)  # route-specific extras (OpenAI size, model...)
    key_id: str | None = None  # the API key that created it (None: a JWT, or adopted from a callback)
    key_limited: bool = False  # charged to its key's quota too (the key had limits): released there too
    # the relay the create was sent to (with `key_index`, its key): polls, downloads go there;
    # "" for a task recorded before relays had ids: the first relay configured
    relay: str = ""

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


@dataclass
class UpdateResult:
    record: TaskRecord | None  # the record after the update (None: unknown rid, not adopted)
    applied: bool = False  # the task object was stored (not stale)
    status_changed: bool = False
    previous_status: str | None = None
    refunded_credits: int = 0
    finished: bool = False  # this update made the task terminal
    event_id: str | None = None  # webhook event enqueued in the same transaction
    adopted: bool = False


@dataclass
class WebhookEvent:
    event_id: str
    rid: str
    tenant_id: str
    seq: int  # order of events within one task
    url: str
    body: bytes
    attempts: int = 0  # delivery attempts made so far
    created_at: float = 0.0


def new_event_id(now: float) -> str:
    """A webhook event's id: `evt_` + milliseconds in hex (fixed width) + randomness, so
    ids sort by creation time and a listing pages by id alone (a page's last event may be
    delivered, and so gone, before the next page is asked for)."""
    return f"evt_{int(now * 1000):012x}{secrets.token_hex(10)}"


@dataclass
class OutboxEntry:
    """One undelivered webhook event as an operator sees it (admin API): where it stands,
    never its URL or body. `next_at` is when a pending event is due (or its current
    attempt's lease ends), None for a dead one; `last_error` is the short reason of the
    last failed attempt (None before any, and after a redelivery)."""

    event_id: str
    tenant_id: str
    rid: str
    task_id: str | None  # the upstream id the tenant sees (None: not known yet, or the task expired)
    seq: int
    state: str  # pending | dead
    attempts: int
    next_at: float | None
    last_error: str | None
    created_at: float


WEBHOOK_STATES = ("pending", "dead")
LAST_ERROR_MAX = 200  # characters of `last_error` kept
DEAD_EVENT_RETENTION = 7 * 86400.0  # how long a dead event is kept for inspection and redelivery


@dataclass
class StoredResponse:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class IdempotencyResult:
    state: str  # "new" (caller owns the key now) | "replay" | "conflict" | "pending" | "unknown"
    response: StoredResponse | None = None  # replay: the kept response
    rid: str | None = None  # unknown: the reservation whose upstream outcome is not known


@dataclass
class Usage:
    """A tenant's quota counters now (UTC day and month). `tasks_this_month` is counted in
    the same steps and by the same period rule as the ledger's `tasks_created`, so it is the
    sum of the tenant's ledger rows for this month."""

    active: int = 0
    tasks_today: int = 0
    credits_today: int = 0
    credits_this_month: int = 0
    tasks_this_month: int = 0


LEDGER_COUNTERS = ("tasks_created", "tasks_succeeded", "tasks_failed", "credits_charged", "credits_refunded")


@dataclass
class LedgerRow:
    """One day of the usage ledger for one tenant, key and relay (`key_id` None: a JWT, or a
    task adopted from a callback; `relay` "": booked before relays had ids, the first relay).
    The counters are LEDGER_COUNTERS; store/rules.py says what books them (`book_*`)."""

    day: str  # YYYY-MM-DD, UTC
    tenant_id: str
    key_id: str | None
    tasks_created: int = 0
    tasks_succeeded: int = 0
    tasks_failed: int = 0
    credits_charged: int = 0
    credits_refunded: int = 0
    relay: str = ""


@dataclass
class Charge:
    """What an admitted create costs, and when (UTC period keys)."""

    credits: int
    day: str
    month: str


# --- tenants, keys and the audit trail (the directory) ---------------------------------


@dataclass
class TenantRecord:
    """A tenant created through the admin API ("source": "api"). Config tenants never live
    in the store; the runtime directory merges both. `policy` is the JSON of a tenant's
    policy (`force`, `defaults`, `hook_hosts`): the store keeps it without reading it."""

    id: str
    name: str = ""
    enabled: bool = True
    limits: Limits = field(default_factory=Limits)
    policy: dict[str, Any] = field(default_factory=dict)
    webhook_secret: str = ""
    # during a webhook secret rotation's grace period deliveries are signed with both
    previous_webhook_secret: str = ""
    previous_webhook_secret_expires_at: float | None = None
    # secrets replaced by earlier rotations whose grace has not ended: secret -> its end
    earlier_webhook_secrets: dict[str, float] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0


CONFIG_KEY_PREFIX = "key_cfg_"  # the id of a key listed in the config file: no record here


@dataclass
class KeyRecord:
    """An API key minted through the admin API (for an API or a config tenant). Only the
    SHA-256 of its secret is kept (`sha256:<hex>`, the config form); during a rotation's
    grace period the previous secret's hash is kept too, until `previous_expires_at`, and
    the hashes replaced by earlier rotations still in their grace in `earlier_hashes`
    (hash -> end), so overlapping rotations each keep the grace they gave."""

    id: str  # key_<hex>
    tenant_id: str
    name: str
    prefix: str  # the secret's first 10 characters, to recognise it in lists
    secret_hash: str
    previous_hash: str = ""
    previous_expires_at: float | None = None
    earlier_hashes: dict[str, float] = field(default_factory=dict)
    created_at: float = 0.0
    expires_at: float | None = None
    last_used_at: float | None = None
    revoked_at: float | None = None
    # contract §15: the key's own limits, scopes (None = all) and networks (None = anywhere)
    limits: Limits = field(default_factory=Limits)
    scopes: tuple[str, ...] | None = None
    allowed_cidrs: tuple[str, ...] | None = None


@dataclass
class AuditEntry:
    """One append-only record of an admin change. Never carries a secret or a hash."""

    id: str  # aud_<ms hex><random>: sorts by time
    time: float
    actor_type: str  # admin_key | jwt | config
    actor_id: str
    action: str  # tenant.create, key.rotate, config.reload, ...
    tenant: str | None = None
    key_id: str | None = None
    changes: dict[str, Any] = field(default_factory=dict)
    request_id: str | None = None
    ip: str | None = None


@dataclass
class DirectorySnapshot:
    """Every API tenant and key at one `version` of the directory."""

    version: int
    tenants: list[TenantRecord]
    keys: list[KeyRecord]


class Store(abc.ABC):
    """The gateway's shared state. Implementations: store/sqlite/, store/redis/ (open_store picks one)."""

    # lifecycle ----------------------------------------------------------------------
    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers and can take writes (readiness:
        a Redis that became a replica answers PING but refuses every write)."""

    async def maintain(self, now: float) -> None:  # noqa: B027 (optional: nothing by default)
        """Periodic housekeeping (expired keys, WAL checkpoints); called off the request path."""

    @abc.abstractmethod
    async def secret(self, name: str, candidate: str) -> str:
        """Get-or-create a shared secret: the first caller's `candidate` wins for everyone."""

    # admission ----------------------------------------------------------------------
    @abc.abstractmethod
    async def take_request(self, tenant_id: str, limits: Limits, now: float, key: KeyLimits | None = None) -> Admission:
        """One token from requests_per_minute (if limited), the tenant's and, with `key`,
        the key's, both or neither. A refusal changes nothing."""

    @abc.abstractmethod
    async def admit_create(
        self,
        tenant_id: str,
        limits: Limits,
        charge: Charge,
        reservation: TaskRecord,
        now: float,
        idempotency_key: str | None = None,
        key: KeyLimits | None = None,
    ) -> Admission:
        """All of a create's limits at once (requests/tasks per minute, active tasks, day and
        month budgets): either every counter moves and `reservation` (status SUBMITTING) is
        inserted, or nothing changes. With `key` (the reservation's key, which has limits)
        the key's quota is checked and charged in the same step (the tenant's limits first,
        then the key's, each in ALL_LIMITS order) and the reservation is `key_limited`: every
        release of it (settle_not_created, apply_update, expire_tasks) releases the key's too.

        `idempotency_key`, a key this create holds (idem_begin said "new"): in the same step
        the pending key records the reservation's rid, so that if the holder vanishes before
        it finishes or binds the key (a crash while the upstream call is out), the key does
        not come free when its lease ends: it binds to that rid (see idem_begin)."""

    @abc.abstractmethod
    async def settle_not_created(self, rid: str, now: float) -> bool:
        """The upstream definitely did not create the task: give back the active slot, the
        day's task and the credits (to the periods they were charged in, if still current),
        and remove the reservation. Only from SUBMITTING/UNKNOWN; returns whether it did."""

    @abc.abstractmethod
    async def assign_relay(self, rid: str, relay: str, key_index: int, now: float) -> bool:
        """Before an admitted create is sent to another relay or key than its reservation
        names (failover): record `relay` and `key_index` on it, and move its ledger booking
        (the task and its credits, on its charge day) to that relay, in one step. Only while
        SUBMITTING (nothing was sent where it could have created anything); returns whether
        it did. The create is sent only after this returned, so a crash never leaves a task
        at a relay its record does not name."""

    @abc.abstractmethod
    async def active_by_relay(self) -> dict[str, int]:
        """Active tasks (counting toward max_active_tasks) per relay id ("" = recorded
        before relays had ids): what a reload that removes a relay must not orphan."""

    @abc.abstractmethod
    async def mark_unknown(self, rid: str, now: float) -> None:
        """SUBMITTING -> UNKNOWN (timeout after sending): the charge stands until settled."""

    @abc.abstractmethod
    async def apply_update(
        self,
        rid: str,
        tenant_id: str,
        task: dict[str, Any],
        now: float,
        *,
        refund_failed: bool,
        adopt: TaskRecord | None = None,
    ) -> UpdateResult:
        """Compare-and-set a new upstream task object onto the record `rid`.

        Stale updates (lower status rank than stored, or anything after a terminal state)
        are no-ops. A status change records the object, frees the active slot on a
        terminal state, refunds credits once on FAILED/CANCELLED when `refund_failed`,
        and, when the record has a hook and this is not just SUBMITTING -> PENDING,
        enqueues a webhook event `{"task": ...}` in the same transaction. Same status:
        the object is replaced (progress) without an event.
        An unknown `rid` with `adopt` given inserts `adopt` (charged as in admit_create,
        without limit checks) and then applies the update."""

    # reads --------------------------------------------------------------------------
    @abc.abstractmethod
    async def get_by_task_id(self, tenant_id: str, task_id: str) -> TaskRecord | None:
        """The tenant's task by upstream id; None for another tenant's or hidden task."""

    async def read_task(
        self, tenant_id: str, limits: Limits, task_id: str, now: float, key: KeyLimits | None = None
    ) -> tuple[Admission, TaskRecord | None]:
        """A status poll: one requests_per_minute token (as take_request), then the tenant's
        task (None when refused or not found). One operation, so a store that pays per round
        trip (Redis) can do both in one; the default is the two calls."""
        admission = await self.take_request(tenant_id, limits, now, key)
        if not admission.ok:
            return admission, None
        return admission, await self.get_by_task_id(tenant_id, task_id)

    @abc.abstractmethod
    async def get_by_rid(self, rid: str) -> TaskRecord | None: ...

    @abc.abstractmethod
    async def list_tasks(
        self, tenant_id: str, *, limit: int, after: str | None = None, status: str | None = None, order: str = "desc"
    ) -> tuple[list[TaskRecord], bool]:
        """The tenant's visible tasks that have an upstream id, by creation time (`desc` =
        newest first), starting after the task `after`; returns (page, has_more)."""

    @abc.abstractmethod
    async def hide_task(self, tenant_id: str, task_id: str) -> bool: ...

    @abc.abstractmethod
    async def usage(self, tenant_id: str, now: float) -> Usage: ...

    @abc.abstractmethod
    async def key_usage(self, key_id: str, now: float) -> Usage:
        """A key's own quota counters now: what its limits are checked against (counted
        while it has limits: a task admitted without key limits is not in them)."""

    @abc.abstractmethod
    async def ledger(
        self, from_day: str, to_day: str, tenant: str | None = None, key_id: str | None = None
    ) -> list[LedgerRow]:
        """The usage ledger's rows from `from_day` to `to_day` (YYYY-MM-DD, UTC, inclusive),
        of one tenant and/or key when given, sorted by (day, tenant, key_id; None first, relay).
        Every row has a counter other than zero. Rows are kept LEDGER_RETENTION_DAYS (rules)."""

    @abc.abstractmethod
    async def active_by_tenant(self) -> dict[str, int]: ...

    @abc.abstractmethod
    async def webhook_pending(self) -> int: ...

    # polling and timeouts -----------------------------------------------------------
    @abc.abstractmethod
    async def claim_poll(self, rid: str, now: float, interval: float) -> bool:
        """Take the right to poll one task now (next_poll_at <= now), pushing next_poll_at
        to now + interval. Across processes at most one caller wins per interval."""

    @abc.abstractmethod
    async def claim_due_polls(
        self, now: float, interval: float, limit: int, timed_out_interval: float, give_up_after: float
    ) -> list[TaskRecord]:
        """Claim up to `limit` non-terminal tasks with an upstream id whose next_poll_at is
        due (as claim_poll). Timed-out tasks are polled every `timed_out_interval` until
        `give_up_after` seconds after creation."""

    @abc.abstractmethod
    async def expire_tasks(
        self, now: float, timeout: float, unknown_timeout: float, in_flight: float | None = None
    ) -> list[TaskRecord]:
        """Active, non-terminal tasks created at or before now - timeout, and active UNKNOWN
        reservations (never identified by the upstream) created at or before now -
        unknown_timeout: free their slot, mark them timed_out (the charge stands).

        First, when `in_flight` is given, active SUBMITTING reservations created at or
        before now - in_flight (rules.lost_in_flight: their gateway died mid-create) become
        UNKNOWN, as mark_unknown would have made them, so the same step may expire them.
        Returns the ones it changed, each once, as they end (a reservation only marked
        UNKNOWN is still active)."""

    # webhook outbox -----------------------------------------------------------------
    @abc.abstractmethod
    async def claim_webhooks(self, now: float, limit: int, lease: float) -> list[WebhookEvent]:
        """Claim due events, only the oldest pending one of each task (order within a
        task), leasing them for `lease` seconds so no other worker takes them meanwhile."""

    @abc.abstractmethod
    async def finish_webhook(
        self,
        event_id: str,
        *,
        delivered: bool,
        attempts: int,
        next_at: float | None,
        now: float,
        error: str | None = None,
    ) -> None:
        """delivered: done, the event is deleted. Otherwise record `attempts` and `error`
        (the attempt's short reason, cut to LAST_ERROR_MAX; never a URL, body or secret);
        retry at `next_at`, or give up when next_at is None: the event is dead, kept for
        DEAD_EVENT_RETENTION seconds from `now` (then deleted), and until then it holds back
        the later events of its task (still pending, not claimed), so that a redelivery
        keeps its place in the task's order."""

    @abc.abstractmethod
    async def list_webhooks(
        self, *, limit: int, after: str | None = None, state: str | None = None, tenant: str | None = None
    ) -> tuple[list[OutboxEntry], bool]:
        """Undelivered events (`state` pending or dead, None = both; of one tenant when
        given), newest first (by id, which sorts by creation), after the event id `after`
        (it need not exist any more); returns (page, has_more)."""

    @abc.abstractmethod
    async def redeliver_webhook(self, event_id: str, now: float, audit: AuditEntry) -> tuple[OutboxEntry, bool] | None:
        """Queue a dead event again, in one atomic step: pending, attempts 0, no last
        error, due at `now`, and `audit` appended with `target.tenant` set to the event's
        tenant. It keeps its seq, so it goes before the later events of its task (which
        waited behind it). Returns (the event as stored, True); (the event as stored,
        False) with nothing written when it is not dead; None when unknown (delivered
        events are deleted, so unknown too)."""

    # uploaded assets ----------------------------------------------------------------
    @abc.abstractmethod
    async def put_asset(self, asset_id: str, content_type: str, data: bytes, expires_at: float, now: float) -> None:
        """Keep an uploaded file until `expires_at`, readable by every replica."""

    @abc.abstractmethod
    async def get_asset(self, asset_id: str, now: float) -> tuple[str, bytes] | None:
        """(content type, bytes) of a kept file; None when unknown or expired."""

    @abc.abstractmethod
    async def delete_asset(self, asset_id: str) -> None:
        """Forget a kept file now (its create failed); nothing when unknown."""

    # idempotency --------------------------------------------------------------------
    @abc.abstractmethod
    async def idem_begin(
        self, tenant_id: str, key: str, fingerprint: str, now: float, lease: float
    ) -> IdempotencyResult:
        """new: the caller now holds the key (for at most `lease` seconds); replay: the kept
        response of an identical body; conflict: another body; pending: still in flight;
        unknown (with `rid`): bound to a reservation whose outcome is not known. A key whose
        lease ended while pending comes free, unless its create was admitted (admit_create
        recorded a rid): then it binds to that rid, kept ORPHAN_KEEP_SECONDS from its lease's
        end, since the vanished holder may have sent the create upstream."""

    @abc.abstractmethod
    async def idem_finish(
        self, tenant_id: str, key: str, response: StoredResponse | None, now: float, ttl: float
    ) -> None:
        """Keep `response` for `ttl` seconds, or free the key when None (429/5xx)."""

    @abc.abstractmethod
    async def idem_bind(self, tenant_id: str, key: str, rid: str, now: float, ttl: float) -> None:
        """The attempt holding the key (still pending) was sent upstream without a usable
        answer: bind the key to its reservation `rid` for `ttl` seconds, so that repeats
        (state "unknown") never create a second task."""

    # the directory: tenants, keys, audit --------------------------------------------
    @abc.abstractmethod
    async def directory_version(self) -> int:
        """A counter every tenant or key change increments (in the same atomic step). A
        process compares it with the version of its in-memory directory, every few hundred
        ms, and reloads when it moved: no store round trip per request."""

    @abc.abstractmethod
    async def load_directory(self) -> DirectorySnapshot:
        """Every API tenant and key, and the version they are at, read consistently."""

    @abc.abstractmethod
    async def create_tenant(self, tenant: TenantRecord, audit: AuditEntry) -> bool:
        """Insert `tenant`, append `audit` and bump the version, atomically. False (and
        nothing written) when a tenant with that id exists."""

    @abc.abstractmethod
    async def update_tenant(
        self, tenant_id: str, changes: dict[str, Any], now: float, audit: AuditEntry
    ) -> TenantRecord | None:
        """Apply `changes` to a stored tenant, append `audit` and bump the version,
        atomically; returns the tenant as stored, or None (nothing written) when unknown.
        Keys of `changes`: name, enabled, policy (replaces it), limits (a dict merged limit
        by limit: a None value removes that limit), webhook_secret,
        previous_webhook_secret, previous_webhook_secret_expires_at. `updated_at` = now."""

    @abc.abstractmethod
    async def rotate_webhook_secret(
        self, tenant_id: str, new_secret: str, grace_until: float | None, now: float, audit: AuditEntry
    ) -> TenantRecord | None:
        """Make `new_secret` the tenant's webhook secret, append `audit` and bump the
        version, in one atomic step: the secret stored at that moment (not one read
        earlier, so concurrent rotations chain) becomes the previous one until
        `grace_until`, or is dropped when `grace_until` is None or not after `now`; a
        previous secret still in its own grace moves to `earlier_webhook_secrets` and keeps
        it (expired ones are dropped). `updated_at` = now. Returns the tenant as stored, or None (nothing written) when
        unknown."""

    @abc.abstractmethod
    async def get_tenant(self, tenant_id: str) -> TenantRecord | None: ...

    @abc.abstractmethod
    async def create_key(self, key: KeyRecord, audit: AuditEntry) -> None:
        """Insert `key`, append `audit` and bump the version, atomically."""

    @abc.abstractmethod
    async def update_key(self, key_id: str, changes: dict[str, Any], audit: AuditEntry) -> KeyRecord | None:
        """Apply `changes` to a key, append `audit` and bump the version, atomically;
        returns the key as stored, or None (nothing written) when unknown. Keys of
        `changes`: name, expires_at, secret_hash, prefix, previous_hash,
        previous_expires_at (a rotation sets the four together), revoked_at."""

    @abc.abstractmethod
    async def rotate_key(
        self, key_id: str, new_hash: str, new_prefix: str, grace_until: float | None, now: float, audit: AuditEntry
    ) -> KeyRecord | None:
        """Make `new_hash` (and `new_prefix`) the key's secret, append `audit` and bump the
        version, in one atomic step: the hash stored at that moment (not one read earlier,
        so concurrent rotations chain) becomes `previous_hash` until `grace_until`, or is
        dropped when `grace_until` is None or not after `now`; a previous hash still in its
        own grace moves to `earlier_hashes` and keeps it (expired ones are dropped). Returns the key as stored;
        None (nothing written) when unknown; a revoked key is refused: returned as stored,
        `revoked_at` set, with nothing written."""

    @abc.abstractmethod
    async def revoke_key(self, key_id: str, now: float, audit: AuditEntry) -> KeyRecord | None:
        """Revoke a key at `now`, append `audit` and bump the version, in one atomic step;
        returns the key as stored, or None (nothing written) when unknown. Idempotent: a
        key already revoked is returned as stored (its first `revoked_at`) with nothing
        written, so racing revocations write one audit entry between them."""

    @abc.abstractmethod
    async def get_key(self, key_id: str) -> KeyRecord | None: ...

    @abc.abstractmethod
    async def list_keys(self, tenant_id: str) -> list[KeyRecord]:
        """A tenant's API keys, newest first (revoked ones included)."""

    @abc.abstractmethod
    async def touch_keys(self, last_used: dict[str, float]) -> None:
        """Raise each key's `last_used_at` to the given time (never lower it), batched by
        the caller; does not bump the directory version (it changes no authentication).
        A config key (id `CONFIG_KEY_PREFIX...`) has no record: its time is kept apart, by
        id, the same way (read with `config_key_uses`); other unknown ids are skipped."""

    @abc.abstractmethod
    async def config_key_uses(self, key_ids: list[str]) -> dict[str, float]:
        """The `last_used_at` `touch_keys` kept for these config key ids (absent: never)."""

    @abc.abstractmethod
    async def append_audit(self, entry: AuditEntry) -> bool:
        """An audit entry not tied to a directory change (config.reload). Idempotent by id,
        atomically: an entry whose id is already stored is not written again (False), so
        several writers of one event (the workers of one reload) leave one entry."""

    @abc.abstractmethod
    async def list_audit(
        self, *, limit: int, after: str | None = None, tenant: str | None = None, action: str | None = None
    ) -> tuple[list[AuditEntry], bool]:
        """Entries newest first, after the entry `after`, filtered by `target.tenant` and
        `action`; returns (page, has_more)."""

    @abc.abstractmethod
    async def prune_audit(self, before: float) -> int:
        """Delete entries older than `before` (the retention); returns how many."""
