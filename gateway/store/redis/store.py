"""The Redis store: the same atomic operations as store/sqlite/, each one Lua script.

Why Lua: Redis runs a script atomically, so every read-then-write (admission, the task
state compare-and-set, claims, settlement) is one indivisible step however many workers and
replicas race, with no WATCH loops. Why one script per operation: each command costs client
CPU (less with client.py than with redis-py, but still the largest part of a Redis-backed
request; docs/benchmarks.md), so each operation is one round trip that also returns
everything the caller needs (rate-limit header info, the record).

Time is always the caller's `now` (never Redis TIME), so tests can move the clock. Numbers
travel as strings (`repr` for floats, parsed with `tonumber`) and floats are stored with
`%.17g`, so a token bucket computed in Lua is bit-for-bit the one `rules.bucket_take` computes.

Key layout (every key starts with `prefix`, "gw:" by default):

    {p}q:{tenant}      hash   quota state: rpm_t/rpm_ts, tpm_t/tpm_ts (token buckets),
                              day, day_tasks, day_credits, month, month_credits
    {p}act             hash   tenant -> active (non-terminal, not timed-out) task count
    {p}kq:{key_id}     hash   an API key's own quota (contract §15), only for a key with
                              limits: the fields of {p}q: plus its `active` task count
    {p}t:{rid}         hash   one TaskRecord (task JSON in `task`, meta keys as `m:{key}`,
                              plus `rank` and the webhook sequence `wh_seq`)
    {p}tid:{task_id}   string upstream task id -> rid
    {p}tt:{tenant}     zset   created_at -> rid: the tenant's visible tasks with a task id
    {p}polls           zset   next_poll_at -> rid: non-terminal tasks with a task id
    {p}actz            zset   created_at -> rid: active tasks, for expire_tasks
    {p}unkz            zset   created_at -> rid: UNKNOWN reservations, for expire_tasks
    {p}subz            zset   created_at -> rid: every admitted reservation, for expire_tasks
                              to find those still SUBMITTING past the in-flight cutoff (an
                              entry leaves at that sweep, whatever became of its task)
    {p}wh:{event_id}   hash   one webhook event (state pending|dead, last_error)
    {p}whq:{rid}       list   a task's undelivered event ids in seq order (head = next; a
                              dead head holds the rest back until redelivered or dropped)
    {p}whdue           zset   heads of whq lists only: a pending one at next_at (or lease
                              end), a dead one at the end of its retention
    {p}whn             string number of pending events (webhook_pending)
    {p}whl, {p}whlt:{tenant}  zset  undelivered event ids at score 0, lexical (newest
                              = greatest id): the admin listing, all and per tenant
    {p}whd, {p}whdt:{tenant}  zset  the same for dead events only
    {p}idem:{tenant}:{sha256(key)}  hash  state (pending|done|unknown), fp, exp,
                              status, headers, body (done), rid (unknown)
    {p}secret:{name}   string shared secrets (first writer wins)
    {p}ready           string the readiness probe's write (expires after 60 s)
    {p}led:{day}       hash   the usage ledger's rows of one UTC day: field
                              "{tenant}<TAB>{key_id}<TAB>{relay}<TAB>{counter}" -> count ("" key
                              = none; without "{relay}<TAB>": booked before relays had ids), a
                              field back at 0 deleted; expires LEDGER_RETENTION_DAYS after
                              its last write

The directory (tenants and keys created through the admin API, and the audit trail); a
record is a hash of strings, encoded by store/directory.py (the same field map SQLite
keeps as JSON):

    {p}ten:{id}        hash   one TenantRecord (limits as `limit.<name>`, policy JSON)
    {p}tens            set    every tenant id
    {p}key:{id}        hash   one KeyRecord (secret hashes only, never a secret)
    {p}keys            set    every key id
    {p}tkeys:{tenant}  zset   created_at -> key id: a tenant's keys (list_keys)
    {p}dirv            string the directory version, INCR'd by every tenant or key change
    {p}aud:{id}        hash   one audit entry: j (its JSON), t (time), ten (tenant), a (action)
    {p}audz            zset   time -> entry id: every entry (listing, prune_audit)
    {p}audt:{tenant}   zset   time -> entry id: entries naming the tenant (?tenant=)
    {p}auda:{action}   zset   time -> entry id: entries of one action (?action=)

Audit listings walk the narrowest index (the tenant's when both filters are given,
checking the action entry by entry); entries at the same time are ordered by id, as in
SQLite.

Retention: a task's hash and its `tid` key get a Redis TTL (`terminal_ttl`, 30 days by
default, 0 = keep forever) once the task is terminal or timed out (a later update renews
it); stale `tt`/`polls` entries are pruned when a listing or a poll claim meets them. A
callback for a task whose record has expired would adopt (and charge) it again.
Dead webhook events are kept `dead_ttl` (7 days) for inspection and redelivery, then
dropped by claim_webhooks when their whdue score comes; delivered ones are deleted.
Idempotency keys expire logically at the caller's `now` (field `exp`) and physically by
Redis PEXPIRE (lease while pending, ttl once done).

The prefix may also come in the URL (`redis://host:6379/0?prefix=gw:`); it then wins over
the `prefix` argument. Scripts build their secondary keys from the prefix, so this needs one
Redis node (or a primary with replicas/Sentinel), not Redis Cluster.

The scripts are files under scripts/ (package resources), one per operation, named after
the Store method; a first line `-- include: lib.lua` prepends the shared helpers. They
restate rules.py, which is the reference they must match.
"""

from __future__ import annotations

import asyncio
import hashlib
from importlib import resources
from typing import Any

import orjson

from gateway.store import directory, rules
from gateway.store.base import (
    ALL_LIMITS,
    DEAD_EVENT_RETENTION,
    KEY_LIMIT,
    LAST_ERROR_MAX,
    LEDGER_COUNTERS,
    ORPHAN_KEEP_SECONDS,
    SUBMITTING,
    Admission,
    AuditEntry,
    Charge,
    DirectorySnapshot,
    IdempotencyResult,
    KeyLimits,
    KeyRecord,
    LedgerRow,
    Limits,
    OutboxEntry,
    Store,
    StoredResponse,
    TaskRecord,
    TenantRecord,
    UpdateResult,
    Usage,
    WebhookEvent,
    new_event_id,
    status_rank,
)
from gateway.store.redis.client import RedisClient, Script
from gateway.store.redis.url import split_prefix
from gateway.store.rules import day_key, month_key

TERMINAL_TTL = 30 * 86400.0
DEAD_EVENT_TTL = DEAD_EVENT_RETENTION
ORPHAN_KEEP = repr(ORPHAN_KEEP_SECONDS)  # seconds, as Lua reads a float back
LEDGER_TTL_MS = str(rules.LEDGER_RETENTION_DAYS * 86400 * 1000)  # after a day hash's last write
INCLUDE_LIB = "-- include: lib.lua\n"


def script_source(name: str) -> str:
    """The Lua of scripts/{name}.lua, with lib.lua in place of its include line. Read as a
    package resource, so it works from a wheel or a zip as from the source tree."""
    folder = resources.files("gateway.store.redis").joinpath("scripts")
    source = folder.joinpath(f"{name}.lua").read_text(encoding="utf-8")
    if source.startswith(INCLUDE_LIB):
        source = folder.joinpath("lib.lua").read_text(encoding="utf-8") + source.removeprefix(INCLUDE_LIB)
    return source


# --- encoding ---------------------------------------------------------------------------


def _num(x: float | int) -> str:
    """A number as a string that Lua's tonumber reads back exactly (repr round-trips)."""
    return repr(float(x)) if isinstance(x, float) else str(x)


def _flag(b: bool) -> str:
    return "1" if b else "0"


def _s(v: bytes | str | None) -> str:
    if v is None:
        return ""
    return v.decode() if isinstance(v, bytes) else v


def _record_blob(rec: TaskRecord) -> bytes:
    """A TaskRecord as a JSON array of HSET field/value strings (meta keys one field each,
    `m:{key}`, value JSON). A field at its default (empty, 0, false, "gen2") is left out:
    every reader, the scripts and `_record_from_map`, reads a missing field as that default,
    as for a record written before the field existed; a new task hash then has about ten
    fields fewer to write and every HGETALL of it fewer to return (Redis CPU per create and
    per poll, docs/benchmarks.md "Round 3"). Only new hashes are written from a blob."""
    fields: list[str] = [
        "rid", rec.rid,
        "tenant_id", rec.tenant_id,
        "status", rec.status,
        "rank", str(status_rank(rec.status)),
        "credits", str(rec.credits),
        "charge_day", rec.charge_day,
        "charge_month", rec.charge_month,
        "created_at", _num(rec.created_at),
        "updated_at", _num(rec.updated_at),
        "next_poll_at", _num(rec.next_poll_at),
    ]  # fmt: skip
    optional = (
        ("task_id", rec.task_id or ""),
        ("key_index", str(rec.key_index) if rec.key_index else ""),
        ("task", orjson.dumps(rec.task).decode() if rec.task else ""),
        ("hook", rec.hook),
        ("task_type", "" if rec.task_type == "gen2" else rec.task_type),
        ("active", "1" if rec.active else ""),
        ("settled", "1" if rec.settled else ""),
        ("timed_out", "1" if rec.timed_out else ""),
        ("deleted", "1" if rec.deleted else ""),
        ("upd", _updated_at(rec.task)),
        ("key_id", rec.key_id or ""),
        ("key_limited", "1" if rec.key_limited else ""),
        ("relay", rec.relay),
    )
    for name, value in optional:
        if value:
            fields += (name, value)
    for key, value in rec.meta.items():
        fields += [f"m:{key}", orjson.dumps(value).decode()]
    return orjson.dumps(fields)


def _updated_at(task: dict[str, Any]) -> str:
    """The upstream's updatedAt, compared as a string to order same-status updates."""
    return str(task.get("updatedAt") or "")


def _pairs(flat: list[Any]) -> dict[str, Any]:
    return {_s(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}


def _record(blob: bytes | str) -> TaskRecord | None:
    """A TaskRecord from a script's `record_json` (None when the hash is gone)."""
    return _record_from_map(_pairs(orjson.loads(blob))) if blob else None


def _record_from_map(h: dict[str, str]) -> TaskRecord | None:
    if not h:
        return None
    meta = {k[2:]: orjson.loads(v) for k, v in h.items() if k.startswith("m:")}
    return TaskRecord(
        rid=h["rid"],
        tenant_id=h["tenant_id"],
        status=h["status"],
        task_id=h.get("task_id") or None,
        key_index=int(h.get("key_index", 0)),
        task=orjson.loads(h.get("task", "{}")),
        hook=h.get("hook", ""),
        task_type=h.get("task_type") or "gen2",
        credits=int(h.get("credits", 0)),
        charge_day=h.get("charge_day", ""),
        charge_month=h.get("charge_month", ""),
        created_at=float(h.get("created_at", 0)),
        updated_at=float(h.get("updated_at", 0)),
        active=h.get("active") == "1",
        settled=h.get("settled") == "1",
        timed_out=h.get("timed_out") == "1",
        deleted=h.get("deleted") == "1",
        next_poll_at=float(h.get("next_poll_at", 0)),
        meta=meta,
        key_id=h.get("key_id") or None,
        key_limited=h.get("key_limited") == "1",
        relay=h.get("relay") or "",
    )


def _key_rpm(key: KeyLimits | None) -> int | None:
    return key.limits.requests_per_minute if key is not None else None


def _request_admission(
    ok: bool, level: float, cap: int | None, klevel: float, kcap: int | None, by_key: bool
) -> Admission:
    """A take_rpm reply (lib.lua) as rules.take_requests answers: the tightest bucket, and
    a refusal named after the bucket that refused."""
    infos = [rules.bucket_info(lv, c) for lv, c in ((level, cap), (klevel, kcap)) if c is not None]
    rate = rules.tightest(infos)
    if ok:
        return Admission(True, rate=rate)
    lv, c, name = (klevel, kcap, KEY_LIMIT + "requests_per_minute") if by_key else (level, cap, "requests_per_minute")
    return Admission(False, name, rules.bucket_retry_after(lv, c or 1), rate)


def _fields_blob(fields: dict[str, str]) -> bytes:
    """A directory record's field map as the JSON array of pairs hset_flat (lib.lua) writes."""
    return orjson.dumps([x for pair in fields.items() for x in pair])


def _fields(blob: bytes | str) -> dict[str, str] | None:
    """A directory record's field map from a script's JSON pairs (None: '', no record)."""
    return {str(k): str(v) for k, v in _pairs(orjson.loads(blob)).items()} if blob else None


def _audit_args(e: AuditEntry) -> list[str | bytes]:
    """The five arguments of append_audit (lib.lua)."""
    return [e.id, _num(e.time), e.tenant or "", e.action, directory.audit_json(e)]


def _records(replies: list[Any]) -> list[TaskRecord]:
    return [r for r in (_record(x) for x in replies) if r is not None]


def _outbox_entry(reply: list[Any]) -> OutboxEntry:
    """An event from a script's outbox_entry (lib.lua); '' stands for none."""
    eid, tenant, rid, task_id, seq, state, attempts, next_at, error, created = map(_s, reply)
    return OutboxEntry(
        event_id=eid,
        tenant_id=tenant,
        rid=rid,
        task_id=task_id or None,
        seq=int(seq),
        state=state,
        attempts=int(attempts),
        next_at=float(next_at) if next_at and state != "dead" else None,
        last_error=error or None,
        created_at=float(created),
    )


def _event(eid: bytes, flat: list[Any]) -> WebhookEvent:
    h = _pairs(flat)
    return WebhookEvent(
        event_id=_s(eid),
        rid=_s(h["rid"]),
        tenant_id=_s(h["tenant_id"]),
        seq=int(h["seq"]),
        url=_s(h["url"]),
        body=bytes(h["body"]),
        attempts=int(h.get("attempts", b"0")),
        created_at=float(h.get("created_at", b"0")),
    )


# --- the store --------------------------------------------------------------------------


class RedisStore(Store):
    """Shared state in one Redis, for several gateway replicas.

    The client never retries a command by itself: a script that timed out after it was sent
    may have run, and running an admission or a settlement twice would double-charge. A
    dead Redis fails within `socket_timeout` instead of hanging.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "gw:",
        socket_timeout: float = 2.0,
        connect_timeout: float = 1.0,
        terminal_ttl: float = TERMINAL_TTL,
        dead_ttl: float = DEAD_EVENT_TTL,
    ):
        url, url_prefix = split_prefix(url)
        self.url = url
        self.prefix = url_prefix if url_prefix is not None else prefix
        self.terminal_ttl = terminal_ttl
        self.dead_ttl = dead_ttl
        self._r = RedisClient(url, socket_timeout=socket_timeout, connect_timeout=connect_timeout)
        self._admit = self._script("admit_create")
        self._take_request = self._script("take_request")
        self._settle = self._script("settle_not_created")
        self._mark_unknown = self._script("mark_unknown")
        self._apply = self._script("apply_update")
        self._get_tid = self._script("get_by_task_id")
        self._read_task = self._script("read_task")
        self._list = self._script("list_tasks")
        self._hide = self._script("hide_task")
        self._claim_poll = self._script("claim_poll")
        self._claim_due = self._script("claim_due_polls")
        self._expire = self._script("expire_tasks")
        self._claim_wh = self._script("claim_webhooks")
        self._finish_wh = self._script("finish_webhook")
        self._list_wh = self._script("list_webhooks")
        self._redeliver_wh = self._script("redeliver_webhook")
        self._idem_begin = self._script("idem_begin")
        self._idem_finish = self._script("idem_finish")
        self._idem_bind = self._script("idem_bind")
        self._secret = self._script("secret")
        self._load_directory = self._script("load_directory")
        self._create_tenant = self._script("create_tenant")
        self._update_tenant = self._script("update_tenant")
        self._rotate_webhook_secret = self._script("rotate_webhook_secret")
        self._create_key = self._script("create_key")
        self._update_key = self._script("update_key")
        self._rotate_key = self._script("rotate_key")
        self._revoke_key = self._script("revoke_key")
        self._list_keys = self._script("list_keys")
        self._touch_keys = self._script("touch_keys")
        self._append_audit = self._script("append_audit")
        self._list_audit = self._script("list_audit")
        self._prune_audit = self._script("prune_audit")
        self._ledger = self._script("ledger")
        self._assign_relay = self._script("assign_relay")
        self._active_by_relay = self._script("active_by_relay")

    def _script(self, name: str) -> Script:
        return self._r.register_script(script_source(name))

    # keys ------------------------------------------------------------------------------
    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def _idem_key(self, tenant_id: str, key: str) -> str:
        return self._k("idem", tenant_id, hashlib.sha256(key.encode()).hexdigest())

    # lifecycle -------------------------------------------------------------------------
    async def open(self) -> None:
        """Load every script once, so the first requests do not pay for it."""
        await self.ping()
        await self._r.load_scripts()

    async def close(self) -> None:
        await self._r.aclose()

    async def ping(self) -> None:
        """A tiny write, not a PING: a primary demoted to replica by a failover still
        answers PING but refuses writes (READONLY), and readiness must say so. The reply
        also makes the client drop that connection and reconnect (see client.py)."""
        await self._r.execute("SET", self._k("ready"), "1", "PX", 60000)

    async def put_asset(self, asset_id: str, content_type: str, data: bytes, expires_at: float, now: float) -> None:
        """One key per upload, expiring by itself: content type, a NUL, then the bytes."""
        ttl_ms = max(1, int((expires_at - now) * 1000))
        await self._r.execute("SET", self._k("asset", asset_id), content_type.encode() + b"\0" + data, "PX", ttl_ms)

    async def get_asset(self, asset_id: str, now: float) -> tuple[str, bytes] | None:
        value = await self._r.execute("GET", self._k("asset", asset_id))
        if value is None:
            return None
        content_type, _, data = bytes(value).partition(b"\0")
        return content_type.decode(), data

    async def delete_asset(self, asset_id: str) -> None:
        await self._r.execute("DEL", self._k("asset", asset_id))

    async def secret(self, name: str, candidate: str) -> str:
        return _s(await self._secret(keys=[self._k("secret", name)], args=[candidate]))

    # admission -------------------------------------------------------------------------
    async def take_request(self, tenant_id: str, limits: Limits, now: float, key: KeyLimits | None = None) -> Admission:
        cap, kcap = limits.requests_per_minute, _key_rpm(key)
        if cap is None and kcap is None:
            return Admission(ok=True)
        args = [self.prefix, _num(now), str(cap or 0), key.key_id if key else "", str(kcap or 0)]
        ok, level, klevel, by_key = await self._take_request(keys=[self._k("q", tenant_id)], args=args)
        return _request_admission(bool(ok), float(level), cap, float(klevel), kcap, bool(by_key))

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
        # The periods are the caller's clock's, as in SQLiteStore (charge.day == day_key(now)
        # when the caller built it from the same `now`); the reservation records them.
        day, month = day_key(now), month_key(now)
        reservation.charge_day, reservation.charge_month, reservation.credits = day, month, charge.credits
        if key is not None:
            reservation.key_id = key.key_id
        args: list[str | bytes] = [
            self.prefix, tenant_id, _num(now),
            *(str(getattr(limits, name) or 0) for name in ALL_LIMITS),
            str(charge.credits), day, month, reservation.rid, _record_blob(reservation),
            reservation.key_id or "", LEDGER_TTL_MS,
            self._idem_key(tenant_id, idempotency_key) if idempotency_key is not None else "", ORPHAN_KEEP,
        ]  # fmt: skip
        if key is not None:
            args += ["1", *(str(getattr(key.limits, name) or 0) for name in ALL_LIMITS)]
        reply = await self._admit(keys=[self._k("q", tenant_id)], args=args)
        ok, failed, rpm_level, tpm_level, *rest = reply
        krpm_level, ktpm_level = rest[-2:]  # after the periods charged when admitted
        # Bucket levels after the take (admitted) or as they stand (refused: nothing taken).
        klimits = key.limits if key is not None else Limits()
        buckets = {
            "requests_per_minute": (float(rpm_level), limits.requests_per_minute),
            "tasks_per_minute": (float(tpm_level), limits.tasks_per_minute),
            KEY_LIMIT + "requests_per_minute": (float(krpm_level), klimits.requests_per_minute),
            KEY_LIMIT + "tasks_per_minute": (float(ktpm_level), klimits.tasks_per_minute),
        }
        rate = rules.tightest([rules.bucket_info(level, cap) for level, cap in buckets.values() if cap is not None])
        if ok:
            # the periods charged: the stored ones when this replica's clock lags (rules.Quota.roll)
            reservation.charge_day, reservation.charge_month = _s(rest[0]), _s(rest[1])
            reservation.key_limited = key is not None
            return Admission(ok=True, rate=rate)
        index = int(failed) - 1
        limit = ALL_LIMITS[index % len(ALL_LIMITS)]
        if index >= len(ALL_LIMITS):
            limit = KEY_LIMIT + limit
        level, cap = buckets.get(limit, (0.0, None))
        return Admission(ok=False, limit=limit, retry_after=rules.retry_after(limit, now, level, cap or 1), rate=rate)

    async def settle_not_created(self, rid: str, now: float) -> bool:
        args = [self.prefix, rid, day_key(now), month_key(now), LEDGER_TTL_MS]
        return bool(await self._settle(keys=[self._k("t", rid)], args=args))

    async def assign_relay(self, rid: str, relay: str, key_index: int, now: float) -> bool:
        args = [self.prefix, rid, relay, str(key_index), str(LEDGER_TTL_MS)]
        return bool(await self._assign_relay(keys=[self._k("t", rid)], args=args))

    async def active_by_relay(self) -> dict[str, int]:
        flat = await self._active_by_relay(keys=[self._k("actz")], args=[self.prefix])
        return {_s(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}

    async def mark_unknown(self, rid: str, now: float) -> None:
        await self._mark_unknown(keys=[self._k("t", rid)], args=[self.prefix, _num(now), rid])

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
        status = str(task.get("status") or "")
        task_json = orjson.dumps(task)
        body = b'{"task":' + task_json + b"}"  # == orjson.dumps({"task": task}), one encode
        adopt_blob = self._adoption(adopt, rid, tenant_id, now) if adopt is not None else b""
        task_id = task.get("id")
        args: list[str | bytes] = [
            self.prefix, rid, tenant_id, task_json, status, str(status_rank(status)),
            _flag(refund_failed), new_event_id(now), body, _num(now),
            str(task_id) if task_id else "", _num(self.terminal_ttl),
            _updated_at(task), day_key(now), month_key(now),
            adopt_blob, LEDGER_TTL_MS,
        ]  # fmt: skip
        reply = await self._apply(keys=[self._k("t", rid)], args=args)
        if not reply[0]:
            return UpdateResult(record=None)
        _, applied, changed, previous, refunded, finished, eid, adopted, flat = reply
        return UpdateResult(
            record=_record(flat),
            applied=bool(applied),
            status_changed=bool(changed),
            previous_status=_s(previous),
            refunded_credits=int(refunded),
            finished=bool(finished),
            event_id=_s(eid) or None,
            adopted=bool(adopted),
        )

    @staticmethod
    def _adoption(adopt: TaskRecord, rid: str, tenant_id: str, now: float) -> bytes:
        """`adopt` as the record to insert: a fresh, active reservation charged to the
        current periods, like an admission (the object is updated, as SQLiteStore does)."""
        if adopt.rid != rid or adopt.tenant_id != tenant_id:
            raise ValueError("adopt must carry the update's rid and tenant_id")
        adopt.status, adopt.active = SUBMITTING, True
        adopt.charge_day, adopt.charge_month = day_key(now), month_key(now)
        return _record_blob(adopt)

    # reads -----------------------------------------------------------------------------
    async def get_by_task_id(self, tenant_id: str, task_id: str) -> TaskRecord | None:
        rec = _record(await self._get_tid(args=[self.prefix, task_id]))
        if rec is None or rec.tenant_id != tenant_id or rec.deleted:
            return None
        return rec

    async def read_task(
        self, tenant_id: str, limits: Limits, task_id: str, now: float, key: KeyLimits | None = None
    ) -> tuple[Admission, TaskRecord | None]:
        cap, kcap = limits.requests_per_minute, _key_rpm(key)
        args = [self.prefix, _num(now), str(cap or 0), task_id, key.key_id if key else "", str(kcap or 0)]
        ok, level, klevel, by_key, blob = await self._read_task(keys=[self._k("q", tenant_id)], args=args)
        admission = _request_admission(bool(ok), float(level), cap, float(klevel), kcap, bool(by_key))
        if not admission.ok:
            return admission, None
        rec = _record(blob)
        if rec is None or rec.tenant_id != tenant_id or rec.deleted:
            return admission, None
        return admission, rec

    async def get_by_rid(self, rid: str) -> TaskRecord | None:
        flat = await self._r.execute("HGETALL", self._k("t", rid))
        return _record_from_map({_s(k): _s(v) for k, v in _pairs(flat).items()})

    async def list_tasks(
        self, tenant_id: str, *, limit: int, after: str | None = None, status: str | None = None, order: str = "desc"
    ) -> tuple[list[TaskRecord], bool]:
        reply = await self._list(
            keys=[self._k("tt", tenant_id)],
            args=[
                self.prefix,
                tenant_id,
                str(max(0, limit)),
                after or "",
                status or "",
                "asc" if order == "asc" else "desc",
            ],
        )
        return _records(reply[1:]), bool(reply[0])

    async def hide_task(self, tenant_id: str, task_id: str) -> bool:
        return bool(await self._hide(args=[self.prefix, tenant_id, task_id]))

    async def usage(self, tenant_id: str, now: float) -> Usage:
        (day, tasks, credits, month, mcredits, mtasks), active = await asyncio.gather(  # auto-pipelined
            self._r.execute(
                "HMGET",
                self._k("q", tenant_id),
                *("day", "day_tasks", "day_credits", "month", "month_credits", "month_tasks"),
            ),
            self._r.execute("HGET", self._k("act"), tenant_id),
        )
        today = _s(day) == day_key(now)
        this_month = _s(month) == month_key(now)
        return Usage(
            active=int(active or 0),
            tasks_today=int(tasks or 0) if today else 0,
            credits_today=int(credits or 0) if today else 0,
            credits_this_month=int(mcredits or 0) if this_month else 0,
            tasks_this_month=int(mtasks or 0) if this_month else 0,
        )

    async def key_usage(self, key_id: str, now: float) -> Usage:
        day, tasks, credits, month, mcredits, mtasks, active = await self._r.execute(
            "HMGET",
            self._k("kq", key_id),
            *("day", "day_tasks", "day_credits", "month", "month_credits", "month_tasks", "active"),
        )
        today = _s(day) == day_key(now)
        this_month = _s(month) == month_key(now)
        return Usage(
            active=max(0, int(active or 0)),
            tasks_today=int(tasks or 0) if today else 0,
            credits_today=int(credits or 0) if today else 0,
            credits_this_month=int(mcredits or 0) if this_month else 0,
            tasks_this_month=int(mtasks or 0) if this_month else 0,
        )

    async def ledger(
        self, from_day: str, to_day: str, tenant: str | None = None, key_id: str | None = None
    ) -> list[LedgerRow]:
        days = rules.days_between(from_day, to_day)
        if not days:
            return []
        args = [self.prefix, tenant or "", _flag(tenant is not None), key_id or "", _flag(key_id is not None)]
        replies = await self._ledger(keys=[self._k("led", day) for day in days], args=args)
        rows: list[LedgerRow] = []
        for day, flat in zip(days, replies, strict=True):
            by_row: dict[tuple[str, str, str], LedgerRow] = {}
            for field_name, value in _pairs(flat).items():
                parts = field_name.split("\t")
                if len(parts) == 3:  # booked before relays had ids
                    parts.insert(2, "")
                if len(parts) != 4 or parts[3] not in LEDGER_COUNTERS:
                    continue
                row_tenant, key, relay, counter = parts
                row = by_row.setdefault((row_tenant, key, relay), LedgerRow(day, row_tenant, key or None, relay=relay))
                setattr(row, counter, int(value))
            rows += sorted(by_row.values(), key=lambda r: rules.ledger_row_key(r.day, r.tenant_id, r.key_id, r.relay))
        return rows

    async def active_by_tenant(self) -> dict[str, int]:
        h = _pairs(await self._r.execute("HGETALL", self._k("act")))
        return {k: int(v) for k, v in h.items() if int(v) > 0}

    async def webhook_pending(self) -> int:
        return max(0, int(await self._r.execute("GET", self._k("whn")) or 0))

    # polling and timeouts --------------------------------------------------------------
    async def claim_poll(self, rid: str, now: float, interval: float) -> bool:
        args = [self.prefix, _num(now), _num(now + interval), rid]
        return bool(await self._claim_poll(keys=[self._k("t", rid)], args=args))

    async def claim_due_polls(
        self, now: float, interval: float, limit: int, timed_out_interval: float, give_up_after: float
    ) -> list[TaskRecord]:
        if limit <= 0:
            return []
        args = [self.prefix, _num(now), _num(interval), str(limit), _num(timed_out_interval), _num(now - give_up_after)]
        return _records(await self._claim_due(keys=[self._k("polls")], args=args))

    async def expire_tasks(
        self, now: float, timeout: float, unknown_timeout: float, in_flight: float | None = None
    ) -> list[TaskRecord]:
        lost_cutoff = "" if in_flight is None else _num(now - in_flight)
        args = [
            self.prefix, _num(now), _num(now - timeout), _num(self.terminal_ttl), _num(now - unknown_timeout),
            lost_cutoff,
        ]  # fmt: skip
        return _records(await self._expire(keys=[self._k("actz")], args=args))

    # webhook outbox --------------------------------------------------------------------
    async def claim_webhooks(self, now: float, limit: int, lease: float) -> list[WebhookEvent]:
        if limit <= 0:
            return []
        reply = await self._claim_wh(
            keys=[self._k("whdue")], args=[self.prefix, _num(now), str(limit), _num(now + lease)]
        )
        return [_event(eid, flat) for eid, flat in reply]

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
        outcome = "delivered" if delivered else ("retry" if next_at is not None else "dead")
        args = [
            self.prefix, event_id, outcome, str(attempts), _num(next_at or 0.0), _num(self.dead_ttl), _num(now),
            (error or "")[:LAST_ERROR_MAX],
        ]  # fmt: skip
        await self._finish_wh(keys=[self._k("wh", event_id)], args=args)

    async def list_webhooks(
        self, *, limit: int, after: str | None = None, state: str | None = None, tenant: str | None = None
    ) -> tuple[list[OutboxEntry], bool]:
        index = "whd" if state == "dead" else "whl"  # pending: every undelivered one, dead skipped
        key = self._k(index + "t", tenant) if tenant is not None else self._k(index)
        args = [self.prefix, str(max(0, limit)), after or "", state or ""]
        reply = await self._list_wh(keys=[key], args=args)
        return [_outbox_entry(e) for e in reply[1:]], bool(reply[0])

    async def redeliver_webhook(self, event_id: str, now: float, audit: AuditEntry) -> tuple[OutboxEntry, bool] | None:
        # The tenant is read first to name it in the audit entry (built here, as JSON): an
        # event's tenant never changes, and the script checks it is still the event's.
        tenant = await self._r.execute("HGET", self._k("wh", event_id), "tenant_id")
        if tenant is None:
            return None
        audit.tenant = _s(tenant)
        args = [self.prefix, event_id, _num(now), audit.tenant, *_audit_args(audit)]
        reply = await self._redeliver_wh(keys=[self._k("wh", event_id)], args=args)
        if not reply[0]:
            return None
        return _outbox_entry(reply[2]), bool(reply[1])

    # idempotency -----------------------------------------------------------------------
    async def idem_begin(
        self, tenant_id: str, key: str, fingerprint: str, now: float, lease: float
    ) -> IdempotencyResult:
        reply = await self._idem_begin(
            keys=[self._idem_key(tenant_id, key)], args=[self.prefix, fingerprint, _num(now), _num(lease), ORPHAN_KEEP]
        )
        state = _s(reply[0])
        if state == "unknown":
            return IdempotencyResult(state=state, rid=_s(reply[1]))
        if state != "replay":
            return IdempotencyResult(state=state)
        status, headers, body = reply[1:]
        return IdempotencyResult(
            state="replay", response=StoredResponse(int(status), orjson.loads(headers), bytes(body))
        )

    async def idem_finish(
        self, tenant_id: str, key: str, response: StoredResponse | None, now: float, ttl: float
    ) -> None:
        if response is None:
            args: list[str | bytes] = [self.prefix, _num(now), _num(ttl), "", "", b""]
        else:
            args = [
                self.prefix,
                _num(now),
                _num(ttl),
                str(response.status),
                orjson.dumps(response.headers),
                response.body,
            ]
        await self._idem_finish(keys=[self._idem_key(tenant_id, key)], args=args)

    async def idem_bind(self, tenant_id: str, key: str, rid: str, now: float, ttl: float) -> None:
        await self._idem_bind(keys=[self._idem_key(tenant_id, key)], args=[self.prefix, _num(now), _num(ttl), rid])

    # the directory: tenants, keys, audit -----------------------------------------------
    async def directory_version(self) -> int:
        return int(await self._r.execute("GET", self._k("dirv")) or 0)

    async def load_directory(self) -> DirectorySnapshot:
        version, tenants, keys = await self._load_directory(args=[self.prefix])
        return DirectorySnapshot(
            int(version),
            [directory.tenant_from_fields(f) for f in map(_fields, tenants) if f is not None],
            [directory.key_from_fields(f) for f in map(_fields, keys) if f is not None],
        )

    async def create_tenant(self, tenant: TenantRecord, audit: AuditEntry) -> bool:
        args = [self.prefix, tenant.id, _fields_blob(directory.tenant_fields(tenant)), *_audit_args(audit)]
        return bool(await self._create_tenant(keys=[self._k("ten", tenant.id)], args=args))

    async def update_tenant(
        self, tenant_id: str, changes: dict[str, Any], now: float, audit: AuditEntry
    ) -> TenantRecord | None:
        put, drop = directory.tenant_changes(changes, now)
        args = [self.prefix, _fields_blob(put), orjson.dumps(drop), *_audit_args(audit)]
        fields = _fields(await self._update_tenant(keys=[self._k("ten", tenant_id)], args=args))
        return directory.tenant_from_fields(fields) if fields is not None else None

    async def rotate_webhook_secret(
        self, tenant_id: str, new_secret: str, grace_until: float | None, now: float, audit: AuditEntry
    ) -> TenantRecord | None:
        put, _ = directory.tenant_changes({"webhook_secret": new_secret}, now)
        grace = directory.grace_field(grace_until, now)
        args = [self.prefix, _fields_blob(put), grace, _num(now), *_audit_args(audit)]
        fields = _fields(await self._rotate_webhook_secret(keys=[self._k("ten", tenant_id)], args=args))
        return directory.tenant_from_fields(fields) if fields is not None else None

    async def get_tenant(self, tenant_id: str) -> TenantRecord | None:
        fields = await self._hash(self._k("ten", tenant_id))
        return directory.tenant_from_fields(fields) if fields else None

    async def create_key(self, key: KeyRecord, audit: AuditEntry) -> None:
        args = [
            self.prefix, key.id, key.tenant_id, _num(key.created_at),
            _fields_blob(directory.key_fields(key)), *_audit_args(audit),
        ]  # fmt: skip
        await self._create_key(keys=[self._k("key", key.id)], args=args)

    async def update_key(self, key_id: str, changes: dict[str, Any], audit: AuditEntry) -> KeyRecord | None:
        put, drop = directory.key_changes(changes)
        args = [self.prefix, _fields_blob(put), orjson.dumps(drop), *_audit_args(audit)]
        fields = _fields(await self._update_key(keys=[self._k("key", key_id)], args=args))
        return directory.key_from_fields(fields) if fields is not None else None

    async def rotate_key(
        self, key_id: str, new_hash: str, new_prefix: str, grace_until: float | None, now: float, audit: AuditEntry
    ) -> KeyRecord | None:
        put, _ = directory.key_changes({"secret_hash": new_hash, "prefix": new_prefix})
        grace = directory.grace_field(grace_until, now)
        args = [self.prefix, _fields_blob(put), grace, _num(now), *_audit_args(audit)]
        fields = _fields(await self._rotate_key(keys=[self._k("key", key_id)], args=args))
        return directory.key_from_fields(fields) if fields is not None else None

    async def revoke_key(self, key_id: str, now: float, audit: AuditEntry) -> KeyRecord | None:
        put, _ = directory.key_changes({"revoked_at": now})
        args = [self.prefix, _fields_blob(put), *_audit_args(audit)]
        fields = _fields(await self._revoke_key(keys=[self._k("key", key_id)], args=args))
        return directory.key_from_fields(fields) if fields is not None else None

    async def get_key(self, key_id: str) -> KeyRecord | None:
        fields = await self._hash(self._k("key", key_id))
        return directory.key_from_fields(fields) if fields else None

    async def list_keys(self, tenant_id: str) -> list[KeyRecord]:
        blobs = await self._list_keys(keys=[self._k("tkeys", tenant_id)], args=[self.prefix])
        return [directory.key_from_fields(f) for f in map(_fields, blobs) if f is not None]

    async def touch_keys(self, last_used: dict[str, float]) -> None:
        if not last_used:
            return
        args = [self.prefix, *(x for key_id, at in last_used.items() for x in (key_id, _num(at)))]
        await self._touch_keys(args=args)

    async def config_key_uses(self, key_ids: list[str]) -> dict[str, float]:
        if not key_ids:
            return {}
        times = await self._r.execute("HMGET", self._k("cfgused"), *key_ids)
        return {k: float(_s(t)) for k, t in zip(key_ids, times, strict=True) if t is not None}

    async def append_audit(self, entry: AuditEntry) -> bool:
        return bool(await self._append_audit(args=[self.prefix, *_audit_args(entry)]))

    async def list_audit(
        self, *, limit: int, after: str | None = None, tenant: str | None = None, action: str | None = None
    ) -> tuple[list[AuditEntry], bool]:
        index = self._k("audz")  # walk the narrowest index; the script checks both filters
        if tenant is not None:
            index = self._k("audt", tenant)
        elif action is not None:
            index = self._k("auda", action)
        args = [self.prefix, str(max(0, limit)), after or "", tenant or "", action or ""]
        reply = await self._list_audit(keys=[index], args=args)
        return [directory.audit_from_json(bytes(b)) for b in reply[1:]], bool(reply[0])

    async def prune_audit(self, before: float) -> int:
        return int(await self._prune_audit(args=[self.prefix, _num(before)]))

    async def _hash(self, key: str) -> dict[str, str]:
        return {_s(k): _s(v) for k, v in _pairs(await self._r.execute("HGETALL", key)).items()}
