"""The quota and task-lifecycle rules as plain Python: the reference every store matches.

SQLiteStore runs these functions inside its transaction. RedisStore cannot: each of its
read-then-write operations must be one Lua script to be atomic, so the scripts under
store/redis/scripts/ state the same rules again in Lua, and **the Lua must match this
module** (lib.lua names the function each helper mirrors). tests/test_store_contract.py
runs the same cases on both stores, and checks the Redis token bucket against
`bucket_take` to the last bit. To change a rule: change it here, then the Lua, then the
contract test. What the Redis store computes in Python (the tightest bucket, retry-after)
calls in here instead of restating it.

Times are UNIX seconds from the caller (never a store's clock); periods are UTC.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from gateway.store.base import (
    KEY_LIMIT,
    ORPHAN_KEEP_SECONDS,
    RATE_LIMITS,
    REFUNDABLE,
    SUBMITTING,
    TERMINAL,
    Admission,
    Limits,
    RateInfo,
    TaskRecord,
    UpdateResult,
    status_rank,
)

# --- token buckets (requests_per_minute, tasks_per_minute) -------------------------------


def bucket_take(tokens: float | None, ts: float, capacity: int, now: float) -> tuple[float, bool]:
    """Token bucket, refilled continuously at `capacity` per minute. Returns the new level and
    whether one token was taken. A missing bucket (None) is full."""
    level = capacity if tokens is None else min(capacity, tokens + max(0.0, now - ts) * capacity / 60.0)
    if level >= 1.0:
        return level - 1.0, True
    return level, False


def bucket_info(level: float, capacity: int) -> RateInfo:
    """The x-ratelimit-*-requests header values of a bucket at `level`."""
    return RateInfo(capacity, math.floor(level), (capacity - level) * 60.0 / capacity)


def bucket_retry_after(level: float, capacity: int) -> float:
    """Seconds until a bucket at `level` holds one whole token again."""
    return max(0.0, (1.0 - level) * 60.0 / capacity)


def tightest(infos: list[RateInfo]) -> RateInfo | None:
    """The bucket closest to refusing: fewest whole tokens left (requests first on a tie).
    The one a response's rate-limit headers describe."""
    return min(infos, key=lambda i: i.remaining) if infos else None


def request_admission(ok: bool, level: float, capacity: int) -> Admission:
    """The answer to one requests_per_minute take that left the bucket at `level`."""
    info = bucket_info(level, capacity)
    if ok:
        return Admission(True, rate=info)
    return Admission(False, "requests_per_minute", bucket_retry_after(level, capacity), info)


# --- periods (UTC day and month) --------------------------------------------------------


def day_key(now: float) -> str:
    return _day_key(int(now // 86400))


def month_key(now: float) -> str:
    return _day_key(int(now // 86400))[:7]


@functools.lru_cache(maxsize=8)
def _day_key(day: int) -> str:
    """`YYYY-MM-DD` of a UTC day number: strftime once a day, not on every admission."""
    return datetime.fromtimestamp(day * 86400, UTC).strftime("%Y-%m-%d")


def seconds_to_next_day(now: float) -> float:
    return 86400 - (now % 86400)


def seconds_to_next_month(now: float) -> float:
    d = datetime.fromtimestamp(now, UTC)
    nxt = datetime(d.year + (d.month == 12), d.month % 12 + 1, 1, tzinfo=UTC)
    return nxt.timestamp() - now


# --- a tenant's quota counters ----------------------------------------------------------


@dataclass
class Quota:
    """A tenant's quota state: two token buckets (level None = full, never used), the
    active task count, and the counters of the current day and month."""

    rpm_tokens: float | None = None
    rpm_ts: float = 0.0
    tpm_tokens: float | None = None
    tpm_ts: float = 0.0
    active: int = 0
    day: str = ""
    day_tasks: int = 0
    day_credits: int = 0
    month: str = ""
    month_credits: int = 0
    month_tasks: int = 0  # no limit counts it: Usage.tasks_this_month, the ledger's month

    def roll(self, now: float) -> None:
        """Start a new day or month when `now` is in one. Periods only move forward: a
        replica whose clock lags must not wipe today's counts (keys compare as strings)."""
        today, this_month = day_key(now), month_key(now)
        if self.day < today:
            self.day, self.day_tasks, self.day_credits = today, 0, 0
        if self.month < this_month:
            self.month, self.month_credits, self.month_tasks = this_month, 0, 0


def retry_after(limit: str, now: float, level: float = 0.0, capacity: int = 1) -> float:
    """When a create refused by `limit` could succeed: the bucket's next token (`level` and
    `capacity` are the refusing bucket's), the next UTC day or month; a full
    max_active_tasks has no known end, so one second. A key's limit as the tenant's."""
    limit = limit.removeprefix(KEY_LIMIT)
    if limit in RATE_LIMITS:
        return bucket_retry_after(level, capacity)
    if limit == "max_active_tasks":
        return 1.0
    if limit == "credits_per_month":
        return seconds_to_next_month(now)
    return seconds_to_next_day(now)


def check_create(
    q: Quota, limits: Limits, credits: int, now: float, key: tuple[Quota, Limits] | None = None
) -> tuple[Admission | None, RateInfo | None]:
    """Check every limit of a create against `q` (rolled to `now`), in ALL_LIMITS order,
    then, with `key` (the key's quota, rolled, and its limits), every limit of the key the
    same way (a key limit's refusal is named KEY_LIMIT + the limit), taking the rate tokens
    in the quotas on success. Returns (the refusal of the first failing limit or None, the
    tightest rate bucket's header info of all of them as it stands after: a refused create
    takes no token, so its buckets are reported as they were)."""
    buckets: list[tuple[float, int, bool]] = []  # (level after, capacity, token taken)
    refusal: Admission | None = None
    for quota, lims, prefix in _quotas(q, limits, key):
        found = _check_quota(quota, lims, credits, now, buckets, budgets=refusal is None)
        if refusal is None and found is not None:
            found.limit = prefix + (found.limit or "")
            refusal = found
    infos = [bucket_info(level + 1.0 if (taken and refusal) else level, cap) for level, cap, taken in buckets]
    return refusal, tightest(infos)


def _quotas(q: Quota, limits: Limits, key: tuple[Quota, Limits] | None) -> list[tuple[Quota, Limits, str]]:
    """The quotas one admission checks, in order, with the prefix naming their limits."""
    return [(q, limits, "")] if key is None else [(q, limits, ""), (key[0], key[1], KEY_LIMIT)]


def _check_quota(
    q: Quota, limits: Limits, credits: int, now: float, buckets: list[tuple[float, int, bool]], budgets: bool
) -> Admission | None:
    """check_create for one quota: its buckets appended to `buckets` (tokens taken in `q`
    when there are), then its budgets when `budgets` and no bucket refused."""
    refusal: Admission | None = None
    for name, cap in (
        ("requests_per_minute", limits.requests_per_minute),
        ("tasks_per_minute", limits.tasks_per_minute),
    ):
        if cap is None:
            continue
        tokens, ts = (q.rpm_tokens, q.rpm_ts) if name == "requests_per_minute" else (q.tpm_tokens, q.tpm_ts)
        level, ok = bucket_take(tokens, ts, cap, now)
        buckets.append((level, cap, ok))
        if not ok:
            refusal = refusal or Admission(False, name, retry_after(name, now, level, cap))
        elif name == "requests_per_minute":
            q.rpm_tokens, q.rpm_ts = level, max(ts, now)
        else:
            q.tpm_tokens, q.tpm_ts = level, max(ts, now)
    if budgets and refusal is None and (limit := budget_exceeded(q, limits, credits)) is not None:
        refusal = Admission(False, limit, retry_after(limit, now))
    return refusal


def take_requests(q: Quota, limits: Limits, now: float, key: tuple[Quota, Limits] | None = None) -> Admission:
    """One requests_per_minute token from the tenant's bucket and, with `key`, from the
    key's: both or neither (the tokens are taken in the quotas only when both admit; the
    tenant's bucket is named first when both are empty). The admission's rate is the
    tightest bucket, as after the take, or as it stands when refused."""
    takes: list[tuple[Quota, int, float, bool, str]] = []
    for quota, lims, prefix in _quotas(q, limits, key):
        cap = lims.requests_per_minute
        if cap is not None:
            level, ok = bucket_take(quota.rpm_tokens, quota.rpm_ts, cap, now)
            takes.append((quota, cap, level, ok, prefix))
    failed = next((t for t in takes if not t[3]), None)
    infos = [bucket_info(level + 1.0 if (failed and ok) else level, cap) for _, cap, level, ok, _ in takes]
    rate = tightest(infos)
    if failed is not None:
        _, cap, level, _, prefix = failed
        return Admission(False, prefix + "requests_per_minute", bucket_retry_after(level, cap), rate)
    for quota, _, level, _, _ in takes:
        quota.rpm_tokens, quota.rpm_ts = level, max(quota.rpm_ts, now)
    return Admission(True, rate=rate)


def budget_exceeded(q: Quota, limits: Limits, credits: int) -> str | None:
    """The first of the active-task, day and month limits one more task of `credits` would
    break, or None."""
    if limits.max_active_tasks is not None and q.active + 1 > limits.max_active_tasks:
        return "max_active_tasks"
    if limits.tasks_per_day is not None and q.day_tasks + 1 > limits.tasks_per_day:
        return "tasks_per_day"
    if limits.credits_per_day is not None and q.day_credits + credits > limits.credits_per_day:
        return "credits_per_day"
    if limits.credits_per_month is not None and q.month_credits + credits > limits.credits_per_month:
        return "credits_per_month"
    return None


def charge(q: Quota, credits: int) -> None:
    """One more active task, charged to the current day and month (an admission, or a task
    adopted from a callback the gateway never recorded)."""
    q.active += 1
    q.day_tasks += 1
    q.day_credits += credits
    q.month_credits += credits
    q.month_tasks += 1


def free_slot(q: Quota) -> None:
    """A task stopped counting toward max_active_tasks (finished, timed out, not created)."""
    q.active = max(0, q.active - 1)


def refund_credits(q: Quota, rec: TaskRecord) -> None:
    """Give a task's credits back to the periods it was charged in, while they are current."""
    if rec.charge_day == q.day:
        q.day_credits = max(0, q.day_credits - rec.credits)
    if rec.charge_month == q.month:
        q.month_credits = max(0, q.month_credits - rec.credits)


def uncharge(q: Quota, rec: TaskRecord) -> None:
    """Undo a reservation the upstream never created: its active slot, the day's task and
    its credits (to the periods it was charged in, while they are current)."""
    if rec.active:
        free_slot(q)
    if rec.charge_day == q.day:
        q.day_tasks = max(0, q.day_tasks - 1)
    if rec.charge_month == q.month:
        q.month_tasks = max(0, q.month_tasks - 1)
    refund_credits(q, rec)


# --- the task state compare-and-set -----------------------------------------------------


@dataclass
class Decision(UpdateResult):
    """An UpdateResult plus what the store still has to do about it."""

    freed_slot: bool = False  # the task was active: give back its max_active_tasks slot
    notify: bool = False  # enqueue a webhook event for the tenant's hook


def decide_update(rec: TaskRecord, task: dict[str, Any], now: float, refund_failed: bool) -> Decision:
    """The compare-and-set of an upstream task object onto `rec`: mutate `rec` when `task`
    is newer, and say what changed.

    Stale (a no-op): no status, anything after a terminal state, a lower status rank, or
    the same status with an older `updatedAt` (compared as strings). A terminal state
    frees the active slot and settles the charge once: FAILED/CANCELLED refund it when
    `refund_failed`. A status change notifies the record's hook, except the first answer
    (SUBMITTING -> PENDING), which the create's own reply already told."""
    new_status = str(task.get("status") or "")
    result = Decision(rec, previous_status=rec.status)
    if not new_status or rec.terminal:
        return result
    if status_rank(new_status) < status_rank(rec.status):
        return result
    if new_status == rec.status and str(task.get("updatedAt") or "") < str(rec.task.get("updatedAt") or ""):
        return result
    result.applied = True
    result.status_changed = new_status != rec.status
    result.notify = (
        result.status_changed and bool(rec.hook) and not (rec.status == SUBMITTING and new_status == "PENDING")
    )
    rec.task, rec.status, rec.updated_at = task, new_status, now
    if rec.task_id is None and task.get("id"):
        rec.task_id = str(task["id"])
    if new_status in TERMINAL:
        result.finished = True
        result.freed_slot = rec.active
        rec.active = False
        if not rec.settled:
            rec.settled = True
            if new_status in REFUNDABLE and refund_failed and rec.credits:
                result.refunded_credits = rec.credits
    return result


def lost_in_flight(rec: TaskRecord, now: float, in_flight: float) -> bool:
    """A reservation still SUBMITTING `in_flight` seconds after its admission (the relay
    timeout plus a margin): no live gateway holds its create any more (one that got an
    answer recorded it; one that timed out marked it UNKNOWN), so the process that sent
    it died mid-create. Its outcome is unknown: the sweep marks it UNKNOWN, and it settles
    like a create that timed out (expire_tasks)."""
    return rec.status == SUBMITTING and rec.active and rec.created_at <= now - in_flight


# --- the usage ledger -------------------------------------------------------------------

LEDGER_RETENTION_DAYS = 400  # a day's rows are kept at least this long


@dataclass
class Booking:
    """What one step adds to one ledger row: (UTC day, tenant, key; "" = no key, relay) and
    the amount for each counter it moves (LEDGER_COUNTERS). A store books it in the same
    transaction or script as the charge or refund it records."""

    day: str
    tenant_id: str
    key_id: str
    deltas: dict[str, int]
    relay: str = ""


def book_charge(rec: TaskRecord) -> Booking:
    """An admission (or an adoption): one task created and its credits, on the charge day."""
    return Booking(
        rec.charge_day,
        rec.tenant_id,
        rec.key_id or "",
        {"tasks_created": 1, "credits_charged": rec.credits},
        rec.relay,
    )


def book_not_created(rec: TaskRecord) -> Booking:
    """The upstream certainly did not create the task: its charge reversed on the charge
    day, so the ledger keeps no trace of it (a row left all zero is dropped)."""
    return Booking(
        rec.charge_day,
        rec.tenant_id,
        rec.key_id or "",
        {"tasks_created": -1, "credits_charged": -rec.credits},
        rec.relay,
    )


def book_relay_move(rec: TaskRecord, relay: str) -> list[Booking]:
    """A reservation moved to another relay before it was sent there (failover): its
    task and credits leave the old relay's row and join the new one's, on the charge day."""
    if relay == rec.relay:
        return []
    moved = Booking(rec.charge_day, rec.tenant_id, rec.key_id or "", {}, relay)
    left = book_not_created(rec)
    moved.deltas = {name: -n for name, n in left.deltas.items()}
    return [left, moved]


def book_update(rec: TaskRecord, decision: UpdateResult, now: float) -> list[Booking]:
    """A task update: a terminal state counts on the day it happens (SUCCEEDED as
    succeeded, FAILED and CANCELLED as failed); a refund on the charge day, the day whose
    budget it restores. Nothing for any other update."""
    bookings: list[Booking] = []
    key = rec.key_id or ""
    if decision.finished:
        counter = "tasks_succeeded" if rec.status == "SUCCEEDED" else "tasks_failed"
        bookings.append(Booking(day_key(now), rec.tenant_id, key, {counter: 1}, rec.relay))
    if decision.refunded_credits:
        refund = {"credits_refunded": decision.refunded_credits}
        bookings.append(Booking(rec.charge_day, rec.tenant_id, key, refund, rec.relay))
    return bookings


def ledger_cutoff(now: float) -> str:
    """The first day still kept: rows of earlier days may be dropped (SQLite's `maintain`;
    Redis expires a day's hash LEDGER_RETENTION_DAYS after its last write)."""
    return day_key(now - LEDGER_RETENTION_DAYS * 86400)


def days_between(from_day: str, to_day: str) -> list[str]:
    """Every UTC day from `from_day` to `to_day` (YYYY-MM-DD, inclusive); [] when from > to."""
    first, last = date.fromisoformat(from_day), date.fromisoformat(to_day)
    return [(first + timedelta(days=n)).isoformat() for n in range((last - first).days + 1)]


def ledger_row_key(day: str, tenant_id: str, key_id: str | None, relay: str = "") -> tuple[str, str, str, str]:
    """The order of ledger rows: day, tenant, key (no key first), relay."""
    return day, tenant_id, key_id or "", relay


# --- idempotency ------------------------------------------------------------------------


def orphaned_idempotency(state: str, rid: str, lease_end: float, now: float) -> bool:
    """A pending key whose lease ended after its create was admitted (a rid recorded): the
    holder vanished, maybe after sending the create upstream, so the key binds to that
    reservation instead of coming free, until ORPHAN_KEEP_SECONDS after the lease's end."""
    return state == "pending" and bool(rid) and lease_end <= now < lease_end + ORPHAN_KEEP_SECONDS
