"""The Redis store: the same atomic operations as store/sqlite.py, each one Lua script.

Why Lua: Redis runs a script atomically, so every read-then-write (admission, the task
state compare-and-set, claims, settlement) is one indivisible step however many workers and
replicas race, with no WATCH loops. Why one script per operation: each command costs client
CPU (~125-190 us with redis-py, docs: measurements; less with store/redis_client.py, still
the largest part of a Redis-backed request), so each operation is one round trip that also
returns everything the caller needs (rate-limit header info, the record).

Time is always the caller's `now` (never Redis TIME), so tests can move the clock. Numbers
travel as strings (`repr` for floats, parsed with `tonumber`) and floats are stored with
`%.17g`, so a token bucket computed in Lua is bit-for-bit the one `bucket_take` computes.

Key layout (every key starts with `prefix`, "gw:" by default):

    {p}q:{tenant}      hash   quota state: rpm_t/rpm_ts, tpm_t/tpm_ts (token buckets),
                              day, day_tasks, day_credits, month, month_credits
    {p}act             hash   tenant -> active (non-terminal, not timed-out) task count
    {p}t:{rid}         hash   one TaskRecord (task JSON in `task`, meta keys as `m:{key}`,
                              plus `rank` and the webhook sequence `wh_seq`)
    {p}tid:{task_id}   string upstream task id -> rid
    {p}tt:{tenant}     zset   created_at -> rid: the tenant's visible tasks with a task id
    {p}polls           zset   next_poll_at -> rid: non-terminal tasks with a task id
    {p}actz            zset   created_at -> rid: active tasks, for expire_tasks
    {p}unkz            zset   created_at -> rid: UNKNOWN reservations, for expire_tasks
    {p}wh:{event_id}   hash   one webhook event (state pending|dead)
    {p}whq:{rid}       list   a task's pending event ids in seq order (head = next)
    {p}whdue           zset   next_at (or lease end) -> event id, heads of whq lists only
    {p}whn             string number of pending events (webhook_pending)
    {p}idem:{tenant}:{sha256(key)}  hash  state (pending|done|unknown), fp, exp,
                              status, headers, body (done), rid (unknown)
    {p}secret:{name}   string shared secrets (first writer wins)
    {p}ready           string the readiness probe's write (expires after 60 s)

Retention: a task's hash and its `tid` key get a Redis TTL (`terminal_ttl`, 30 days by
default, 0 = keep forever) once the task is terminal or timed out (a later update renews
it); stale `tt`/`polls` entries are pruned when a listing or a poll claim meets them. A
callback for a task whose record has expired would adopt (and charge) it again.
Dead webhook events are kept `dead_ttl` (7 days) for inspection; delivered ones are deleted.
Idempotency keys expire logically at the caller's `now` (field `exp`) and physically by
Redis PEXPIRE (lease while pending, ttl once done).

The prefix may also come in the URL (`redis://host:6379/0?prefix=gw:`); it then wins over
the `prefix` argument. Scripts build their secondary keys from the prefix, so this needs one Redis node (or a
primary with replicas/Sentinel), not Redis Cluster.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson

from gateway.config import Limits
from gateway.store.redis_client import RedisClient
from gateway.store.base import (
    ALL_LIMITS,
    SUBMITTING,
    Admission,
    Charge,
    IdempotencyResult,
    RateInfo,
    Store,
    StoredResponse,
    TaskRecord,
    UpdateResult,
    Usage,
    WebhookEvent,
    bucket_info,
    bucket_retry_after,
    day_key,
    month_key,
    seconds_to_next_day,
    seconds_to_next_month,
    status_rank,
)

TERMINAL_TTL = 30 * 86400.0
DEAD_EVENT_TTL = 7 * 86400.0

# --- Lua ---------------------------------------------------------------------------------
# Shared helpers, prepended to every script that needs them. ARGV[1] is always the prefix.
LUA_LIB = r"""
local P = ARGV[1]
local TERMINAL = {SUCCEEDED = true, FAILED = true, CANCELLED = true}
local REFUNDABLE = {FAILED = true, CANCELLED = true}

local function fmt(x) return string.format('%.17g', x) end

-- Byte-wise a < b, as SQLite and Python compare: Lua's `<` on strings uses strcoll, and
-- Redis takes LC_COLLATE from its environment.
local function lt(a, b)
  if a == b then return false end  -- the usual case (today's day key): no byte loop
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end

-- A period counter moves forward only: a newer period key resets it, an older one (a
-- replica whose clock is behind) is charged to the stored, current period.
local function charge(q, day, month, tasks, credits)
  local d = redis.call('HGET', q, 'day')
  if (not d) or lt(d, day) then
    redis.call('HSET', q, 'day', day, 'day_tasks', tasks, 'day_credits', credits)
  else
    redis.call('HINCRBY', q, 'day_tasks', tasks)
    redis.call('HINCRBY', q, 'day_credits', credits)
  end
  local m = redis.call('HGET', q, 'month')
  if (not m) or lt(m, month) then
    redis.call('HSET', q, 'month', month, 'month_credits', credits)
  else
    redis.call('HINCRBY', q, 'month_credits', credits)
  end
end

local function decr_floor(key, field, n)
  if n == 0 then return end
  local v = redis.call('HINCRBY', key, field, -n)
  if v < 0 then redis.call('HSET', key, field, 0) end
end

-- Give back to the periods the charge was made in, only while they are still current
-- (today, this_month: the caller's clock).
local function refund(q, day, month, today, this_month, tasks, credits)
  local v = redis.call('HMGET', q, 'day', 'month')
  if day == today and v[1] == day then
    decr_floor(q, 'day_tasks', tasks)
    decr_floor(q, 'day_credits', credits)
  end
  if month == this_month and v[2] == month then
    decr_floor(q, 'month_credits', credits)
  end
end

local function tkey(rid) return P .. 't:' .. rid end

-- A token bucket's level at `now` (full when new) and its stored time, computed exactly as
-- bucket_take does in Python; bucket_store keeps what is left after a take.
local function bucket_level(q, name, cap, now)
  local v = redis.call('HMGET', q, name .. '_t', name .. '_ts')
  if not v[1] then return cap, now end
  local ts = tonumber(v[2])
  return math.min(cap, tonumber(v[1]) + math.max(0, now - ts) * cap / 60.0), ts
end

local function bucket_store(q, name, level, ts, now)
  redis.call('HSET', q, name .. '_t', fmt(level), name .. '_ts', fmt(math.max(ts, now)))
end

-- A record as one JSON array of its hash's field/value strings: the client parses each
-- reply element in Python, so one bulk string costs far less client CPU than ~44.
local function record_json(rid)
  local h = redis.call('HGETALL', tkey(rid))
  if #h == 0 then return '' end
  return cjson.encode(h)
end

-- Put a freshly written record into the indexes its fields call for.
local function index_record(rid)
  local r = redis.call('HMGET', tkey(rid), 'tenant_id', 'task_id', 'created_at', 'next_poll_at', 'active', 'status', 'deleted')
  local tenant, tid, created, npa, active, status, deleted = r[1], r[2], r[3], r[4], r[5], r[6], r[7]
  local terminal = TERMINAL[status]
  if tid and tid ~= '' then
    redis.call('SET', P .. 'tid:' .. tid, rid)
    if deleted ~= '1' then redis.call('ZADD', P .. 'tt:' .. tenant, created, rid) end
    if not terminal then redis.call('ZADD', P .. 'polls', npa, rid) end
  end
  if active == '1' and not terminal then
    redis.call('ZADD', P .. 'actz', created, rid)
    redis.call('HINCRBY', P .. 'act', tenant, 1)
  end
end

-- HSET a record given as one JSON array of field/value strings (one argument instead of
-- ~44: the client packs every argument in Python).
local function write_record(rid, blob)
  redis.call('HSET', tkey(rid), unpack(cjson.decode(blob)))
end

-- Retention: a finished (or timed-out) task's hash and task-id key expire after
-- `seconds` (0 = keep forever).
local function retain(rid, seconds)
  local ms = math.floor(tonumber(seconds) * 1000)
  if ms <= 0 then return end
  redis.call('PEXPIRE', tkey(rid), ms)
  local tid = redis.call('HGET', tkey(rid), 'task_id')
  if tid and tid ~= '' then redis.call('PEXPIRE', P .. 'tid:' .. tid, ms) end
end

-- The next pending event of a task becomes schedulable once the one before it is done.
local function promote_head(rid)
  local head = redis.call('LINDEX', P .. 'whq:' .. rid, 0)
  if head then
    local at = redis.call('HGET', P .. 'wh:' .. head, 'next_at')
    redis.call('ZADD', P .. 'whdue', at or '0', head)
  end
end
"""

# ARGV: P, tenant, now, rpm, tpm, max_active, tasks_day, credits_day, credits_month,
#       credits, day, month, rid, record JSON   (limit 0 = unlimited)
# -> {ok, index of the failing limit (1-based, ALL_LIMITS order), rpm level, tpm level}
LUA_ADMIT = LUA_LIB + r"""
local q = KEYS[1]
local tenant = ARGV[2]
local now = tonumber(ARGV[3])
local caps = {tonumber(ARGV[4]), tonumber(ARGV[5])}
local max_active = tonumber(ARGV[6])
local tasks_day, credits_day, credits_month = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local credits, day, month, rid = tonumber(ARGV[10]), ARGV[11], ARGV[12], ARGV[13]
local names = {'rpm', 'tpm'}

local levels, stamps = {-1, -1}, {now, now}
local failed = 0
for i = 1, 2 do
  if caps[i] > 0 then
    levels[i], stamps[i] = bucket_level(q, names[i], caps[i], now)
    if failed == 0 and levels[i] < 1.0 then failed = i end
  end
end

local function used(period_field, key, counter)
  local v = redis.call('HMGET', q, period_field, counter)
  if v[1] and not lt(v[1], key) then return tonumber(v[2]) or 0 end
  return 0
end

if failed == 0 and max_active > 0 then
  local a = tonumber(redis.call('HGET', P .. 'act', tenant) or '0')
  if a >= max_active then failed = 3 end
end
if failed == 0 and tasks_day > 0 and used('day', day, 'day_tasks') + 1 > tasks_day then failed = 4 end
if failed == 0 and credits_day > 0 and used('day', day, 'day_credits') + credits > credits_day then failed = 5 end
if failed == 0 and credits_month > 0 and used('month', month, 'month_credits') + credits > credits_month then failed = 6 end

if failed ~= 0 then
  return {0, failed, fmt(levels[1]), fmt(levels[2])}
end

for i = 1, 2 do
  if caps[i] > 0 then
    levels[i] = levels[i] - 1.0
    bucket_store(q, names[i], levels[i], stamps[i], now)
  end
end
charge(q, day, month, 1, credits)
write_record(rid, ARGV[14])
index_record(rid)
return {1, 0, fmt(levels[1]), fmt(levels[2])}
"""

# ARGV: P, now, capacity -> {ok, level}
LUA_TAKE_REQUEST = LUA_LIB + r"""
local q = KEYS[1]
local now, cap = tonumber(ARGV[2]), tonumber(ARGV[3])
local level, ts = bucket_level(q, 'rpm', cap, now)
if level < 1.0 then return {0, fmt(level)} end
bucket_store(q, 'rpm', level - 1.0, ts, now)
return {1, fmt(level - 1.0)}
"""

# ARGV: P, now, capacity (0 = unlimited), task_id -> {ok, level, record JSON or ''}
# A status poll: LUA_TAKE_REQUEST, then LUA_GET_BY_TASK_ID when admitted (Store.read_task).
LUA_READ_TASK = LUA_LIB + r"""
local q = KEYS[1]
local now, cap = tonumber(ARGV[2]), tonumber(ARGV[3])
local level = 0
if cap > 0 then
  local ts
  level, ts = bucket_level(q, 'rpm', cap, now)
  if level < 1.0 then return {0, fmt(level), ''} end
  level = level - 1.0
  bucket_store(q, 'rpm', level, ts, now)
end
local rid = redis.call('GET', P .. 'tid:' .. ARGV[4])
if not rid then return {1, fmt(level), ''} end
return {1, fmt(level), record_json(rid)}
"""

# ARGV: P, rid, today, this month -> 1 when the reservation was settled and removed
LUA_SETTLE_NOT_CREATED = LUA_LIB + r"""
local rid = ARGV[2]
local k = KEYS[1]
local r = redis.call('HMGET', k, 'status', 'settled', 'active', 'tenant_id', 'credits', 'charge_day', 'charge_month', 'task_id')
local status, settled, active, tenant = r[1], r[2], r[3], r[4]
if not status then return 0 end
if (status ~= 'SUBMITTING' and status ~= 'UNKNOWN') or settled == '1' then return 0 end
if active == '1' then
  decr_floor(P .. 'act', tenant, 1)
end
refund(P .. 'q:' .. tenant, r[6], r[7], ARGV[3], ARGV[4], 1, tonumber(r[5]) or 0)
local tid = r[8]
if tid and tid ~= '' then
  if redis.call('GET', P .. 'tid:' .. tid) == rid then redis.call('DEL', P .. 'tid:' .. tid) end
  redis.call('ZREM', P .. 'tt:' .. tenant, rid)
end
redis.call('ZREM', P .. 'polls', rid)
redis.call('ZREM', P .. 'actz', rid)
redis.call('ZREM', P .. 'unkz', rid)
redis.call('DEL', k)
return 1
"""

# ARGV: P, now, rid
LUA_MARK_UNKNOWN = r"""
local r = redis.call('HMGET', KEYS[1], 'status', 'created_at', 'active')
if r[1] == 'SUBMITTING' then
  redis.call('HSET', KEYS[1], 'status', 'UNKNOWN', 'updated_at', ARGV[2])
  if r[3] == '1' then redis.call('ZADD', ARGV[1] .. 'unkz', r[2], ARGV[3]) end
  return 1
end
return 0
"""

# ARGV: P, rid, tenant, task_json, status, rank, refund, event_id, body, now, task_id,
#       terminal_ttl, updatedAt, today, this month, adopt record JSON ('' = none)
# -> {found, applied, changed, previous, refunded, finished, event_id, adopted, record}
LUA_APPLY_UPDATE = LUA_LIB + r"""
local k = KEYS[1]
local rid, tenant, task_json, status = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local rank = tonumber(ARGV[6])
local refund_failed = ARGV[7] == '1'
local event_id, body, now, task_id = ARGV[8], ARGV[9], ARGV[10], ARGV[11]
local upd, today, this_month = ARGV[13], ARGV[14], ARGV[15]

local adopted = 0
if redis.call('EXISTS', k) == 0 then
  if ARGV[16] == '' then return {0} end
  write_record(rid, ARGV[16])
  local a = redis.call('HMGET', k, 'tenant_id', 'credits', 'charge_day', 'charge_month')
  charge(P .. 'q:' .. a[1], a[3], a[4], 1, tonumber(a[2]) or 0)
  index_record(rid)
  adopted = 1
end

local r = redis.call('HMGET', k, 'tenant_id', 'status', 'rank', 'active', 'settled', 'credits',
  'charge_day', 'charge_month', 'hook', 'task_id', 'deleted', 'created_at', 'next_poll_at', 'upd')
if r[1] ~= tenant then return {0} end
local cur = r[2]
-- The compare-and-set: no status, anything after a terminal state, a lower rank, or the
-- same status with an older updatedAt is stale.
local stale = status == '' or TERMINAL[cur] or rank < tonumber(r[3] or '0')
  or (status == cur and lt(upd, r[14] or ''))
if stale then
  return {1, 0, 0, cur, 0, 0, '', adopted, record_json(rid)}
end

local changed = status ~= cur
if cur == 'UNKNOWN' then redis.call('ZREM', P .. 'unkz', rid) end
redis.call('HSET', k, 'task', task_json, 'status', status, 'rank', ARGV[6], 'updated_at', now, 'upd', upd)

local tid = r[10]
if (not tid or tid == '') and task_id ~= '' then
  tid = task_id
  redis.call('HSET', k, 'task_id', tid)
  redis.call('SET', P .. 'tid:' .. tid, rid)
  if r[11] ~= '1' then redis.call('ZADD', P .. 'tt:' .. tenant, r[12], rid) end
  if not TERMINAL[status] then redis.call('ZADD', P .. 'polls', r[13], rid) end
end

local refunded, finished, eid = 0, 0, ''
if TERMINAL[status] then
  finished = 1
  if r[4] == '1' then
    redis.call('HSET', k, 'active', '0')
    decr_floor(P .. 'act', tenant, 1)
    redis.call('ZREM', P .. 'actz', rid)
  end
  redis.call('ZREM', P .. 'polls', rid)
  if r[5] ~= '1' then
    if refund_failed and REFUNDABLE[status] then
      refunded = tonumber(r[6]) or 0
      refund(P .. 'q:' .. tenant, r[7], r[8], today, this_month, 0, refunded)
    end
    redis.call('HSET', k, 'settled', '1')
  end
end
local hook = r[9]
if changed and hook and hook ~= '' and not (cur == 'SUBMITTING' and status == 'PENDING') then
  eid = event_id
  local seq = redis.call('HINCRBY', k, 'wh_seq', 1)
  redis.call('HSET', P .. 'wh:' .. eid, 'rid', rid, 'tenant_id', tenant, 'seq', seq, 'url', hook,
    'body', body, 'attempts', 0, 'created_at', now, 'next_at', now, 'state', 'pending')
  local n = redis.call('RPUSH', P .. 'whq:' .. rid, eid)
  if n == 1 then redis.call('ZADD', P .. 'whdue', now, eid) end
  redis.call('INCR', P .. 'whn')
end
if finished == 1 then retain(rid, ARGV[12]) end
return {1, 1, changed and 1 or 0, cur, refunded, finished, eid, adopted, record_json(rid)}
"""

# ARGV: P, task_id -> record JSON or ''
LUA_GET_BY_TASK_ID = LUA_LIB + r"""
local rid = redis.call('GET', P .. 'tid:' .. ARGV[2])
if not rid then return '' end
return record_json(rid)
"""

# ARGV: P, tenant, limit, after task id, status filter, order -> {has_more, record...}
LUA_LIST = LUA_LIB + r"""
local z = KEYS[1]
local tenant, limit, after, want, desc = ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5], ARGV[6] == 'desc'
local c_score, c_rid = nil, nil
if after ~= '' then
  local arid = redis.call('GET', P .. 'tid:' .. after)
  if not arid then return {0} end
  local a = redis.call('HMGET', tkey(arid), 'tenant_id', 'created_at')
  if a[1] ~= tenant then return {0} end
  c_score, c_rid = tonumber(a[2]), arid
end

-- Is (score, rid) strictly after the cursor in the listing order?
local function past_cursor(score, rid)
  if not c_score then return true end
  if score ~= c_score then return true end
  if desc then return lt(rid, c_rid) else return lt(c_rid, rid) end
end

local out, stale = {0}, {}
local offset, batch = 0, 100
local found = 0
while found <= limit do
  local page
  if desc then
    page = redis.call('ZREVRANGEBYSCORE', z, c_score and fmt(c_score) or '+inf', '-inf', 'WITHSCORES', 'LIMIT', offset, batch)
  else
    page = redis.call('ZRANGEBYSCORE', z, c_score and fmt(c_score) or '-inf', '+inf', 'WITHSCORES', 'LIMIT', offset, batch)
  end
  if #page == 0 then break end
  offset = offset + batch
  for i = 1, #page, 2 do
    local rid, score = page[i], tonumber(page[i + 1])
    if past_cursor(score, rid) then
      local st = redis.call('HMGET', tkey(rid), 'status', 'deleted')
      if not st[1] then
        stale[#stale + 1] = rid
      elseif st[2] ~= '1' and (want == '' or st[1] == want) then
        found = found + 1
        if found > limit then out[1] = 1 break end
        out[#out + 1] = record_json(rid)
      end
    end
  end
end
if #stale > 0 then redis.call('ZREM', z, unpack(stale)) end
return out
"""

# ARGV: P, tenant, task_id -> 1 when hidden now
LUA_HIDE = LUA_LIB + r"""
local rid = redis.call('GET', P .. 'tid:' .. ARGV[3])
if not rid then return 0 end
local r = redis.call('HMGET', tkey(rid), 'tenant_id', 'deleted')
if r[1] ~= ARGV[2] or r[2] == '1' then return 0 end
redis.call('HSET', tkey(rid), 'deleted', '1')
redis.call('ZREM', P .. 'tt:' .. ARGV[2], rid)
return 1
"""

# ARGV: P, field/value pairs (meta keys as m:{key}, values JSON)
LUA_SET_META = r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local args = {}
for i = 2, #ARGV do args[#args + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(args))
return 1
"""

# ARGV: P, now, next_poll_at
LUA_CLAIM_POLL = r"""
local r = redis.call('HMGET', KEYS[1], 'next_poll_at', 'status')
if not r[1] then return 0 end
if r[2] == 'SUCCEEDED' or r[2] == 'FAILED' or r[2] == 'CANCELLED' then return 0 end
if tonumber(r[1]) > tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'next_poll_at', ARGV[3])
redis.call('ZADD', ARGV[1] .. 'polls', 'XX', ARGV[3], ARGV[4])
return 1
"""

# ARGV: P, now, interval, limit, timed_out_interval, give-up cutoff (now - give_up_after)
# -> {record...}. Tasks created at or before the cutoff are dropped from the poll index.
LUA_CLAIM_DUE_POLLS = LUA_LIB + r"""
local z = P .. 'polls'
local now, interval, limit = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local to_interval, cutoff = tonumber(ARGV[5]), tonumber(ARGV[6])
local out, seen = {}, {}
while #out < limit do
  local due = redis.call('ZRANGEBYSCORE', z, '-inf', ARGV[2], 'LIMIT', 0, limit - #out)
  if #due == 0 then break end
  local progressed = false
  for _, rid in ipairs(due) do
    if not seen[rid] then
      seen[rid] = true
      progressed = true
      local r = redis.call('HMGET', tkey(rid), 'status', 'timed_out', 'created_at', 'task_id')
      if (not r[1]) or TERMINAL[r[1]] or (not r[4]) or r[4] == '' then
        redis.call('ZREM', z, rid)
      elseif tonumber(r[3]) <= cutoff then
        redis.call('ZREM', z, rid)
      else
        local nxt = fmt(now + ((r[2] == '1') and to_interval or interval))
        redis.call('HSET', tkey(rid), 'next_poll_at', nxt)
        redis.call('ZADD', z, nxt, rid)
        out[#out + 1] = record_json(rid)
      end
    end
  end
  if not progressed then break end
end
return out
"""

# ARGV: P, now, cutoff (now - timeout; created at or before it expires), ttl,
#       unknown cutoff (now - unknown_timeout, for UNKNOWN reservations) -> {record...}
# A timed-out task's hash gets the retention TTL too: one the upstream never answers for
# would otherwise stay forever (a later update renews the TTL).
LUA_EXPIRE = LUA_LIB + r"""
local out = {}
local function expire(rid, only_status)
  local r = redis.call('HMGET', tkey(rid), 'active', 'status', 'tenant_id')
  if r[1] ~= '1' or TERMINAL[r[2]] or (only_status and r[2] ~= only_status) then return end
  redis.call('HSET', tkey(rid), 'active', '0', 'timed_out', '1', 'updated_at', ARGV[2])
  decr_floor(P .. 'act', r[3], 1)
  redis.call('ZREM', P .. 'actz', rid)
  redis.call('ZREM', P .. 'unkz', rid)
  retain(rid, ARGV[4])
  out[#out + 1] = record_json(rid)
end
for _, z in ipairs({{P .. 'actz', ARGV[3], nil}, {P .. 'unkz', ARGV[5], 'UNKNOWN'}}) do
  for _, rid in ipairs(redis.call('ZRANGEBYSCORE', z[1], '-inf', z[2])) do
    redis.call('ZREM', z[1], rid)  -- entries of finished or settled tasks are stale: pruned here
    expire(rid, z[3])
  end
end
return out
"""

# ARGV: P, now, limit, lease end -> {event hash...}
LUA_CLAIM_WEBHOOKS = r"""
local z = ARGV[1] .. 'whdue'
local out = {}
local due = redis.call('ZRANGEBYSCORE', z, '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
for _, eid in ipairs(due) do
  local h = redis.call('HGETALL', ARGV[1] .. 'wh:' .. eid)
  if #h == 0 then
    redis.call('ZREM', z, eid)
  else
    redis.call('ZADD', z, ARGV[4], eid)
    out[#out + 1] = {eid, h}
  end
end
return out
"""

# ARGV: P, event_id, outcome (delivered|retry|dead), attempts, next_at, dead_ttl
LUA_FINISH_WEBHOOK = LUA_LIB + r"""
local eid, outcome = ARGV[2], ARGV[3]
local ek = P .. 'wh:' .. eid
local r = redis.call('HMGET', ek, 'state', 'rid')
if r[1] ~= 'pending' then return 0 end
local rid = r[2]
if outcome == 'retry' then
  redis.call('HSET', ek, 'attempts', ARGV[4], 'next_at', ARGV[5])
  if redis.call('LINDEX', P .. 'whq:' .. rid, 0) == eid then
    redis.call('ZADD', P .. 'whdue', ARGV[5], eid)
  end
  return 1
end
redis.call('LREM', P .. 'whq:' .. rid, 1, eid)
redis.call('ZREM', P .. 'whdue', eid)
local n = redis.call('DECR', P .. 'whn')
if n < 0 then redis.call('SET', P .. 'whn', 0) end
if outcome == 'delivered' then
  redis.call('DEL', ek)
else
  redis.call('HSET', ek, 'attempts', ARGV[4], 'state', 'dead')
  redis.call('PEXPIRE', ek, math.floor(tonumber(ARGV[6]) * 1000))
end
promote_head(rid)
return 1
"""

# ARGV: P, fingerprint, now, lease -> {state, status, headers, body} | {'unknown', rid}
LUA_IDEM_BEGIN = r"""
local k = KEYS[1]
local now = tonumber(ARGV[3])
local h = redis.call('HMGET', k, 'state', 'fp', 'exp', 'status', 'headers', 'body', 'rid')
if h[1] and tonumber(h[3]) > now then
  if h[2] ~= ARGV[2] then return {'conflict'} end
  if h[1] == 'pending' then return {'pending'} end
  if h[1] == 'unknown' then return {'unknown', h[7]} end
  return {'replay', h[4], h[5], h[6]}
end
redis.call('DEL', k)
local lease = tonumber(ARGV[4])
redis.call('HSET', k, 'state', 'pending', 'fp', ARGV[2], 'exp', string.format('%.17g', now + lease))
redis.call('PEXPIRE', k, math.max(1, math.ceil(lease * 1000)))
return {'new'}
"""

# ARGV: P, now, ttl, status, headers, body   (status '' = free the key)
LUA_IDEM_FINISH = r"""
local k = KEYS[1]
if ARGV[4] == '' then
  if redis.call('HGET', k, 'state') == 'pending' then redis.call('DEL', k) end
  return 1
end
if redis.call('EXISTS', k) == 0 then return 0 end
local ttl = tonumber(ARGV[3])
redis.call('HSET', k, 'state', 'done', 'exp', string.format('%.17g', tonumber(ARGV[2]) + ttl),
  'status', ARGV[4], 'headers', ARGV[5], 'body', ARGV[6])
redis.call('PEXPIRE', k, math.max(1, math.ceil(ttl * 1000)))
return 1
"""

# ARGV: P, now, ttl, rid   (only a key still pending: its holder's attempt)
LUA_IDEM_BIND = r"""
local k = KEYS[1]
if redis.call('HGET', k, 'state') ~= 'pending' then return 0 end
local ttl = tonumber(ARGV[3])
redis.call('HSET', k, 'state', 'unknown', 'rid', ARGV[4], 'exp', string.format('%.17g', tonumber(ARGV[2]) + ttl))
redis.call('PEXPIRE', k, math.max(1, math.ceil(ttl * 1000)))
return 1
"""

# ARGV: candidate -> the secret everyone uses
LUA_SECRET = r"""
local v = redis.call('GET', KEYS[1])
if v then return v end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
"""


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
    """A TaskRecord as a JSON array of HSET field/value strings. Meta keys are one field
    each, so set_meta merges with a plain HSET instead of re-encoding JSON in Lua."""
    fields: list[str] = [
        "rid", rec.rid,
        "tenant_id", rec.tenant_id,
        "status", rec.status,
        "rank", str(status_rank(rec.status)),
        "task_id", rec.task_id or "",
        "key_index", str(rec.key_index),
        "task", orjson.dumps(rec.task).decode(),
        "hook", rec.hook,
        "task_type", rec.task_type,
        "credits", str(rec.credits),
        "charge_day", rec.charge_day,
        "charge_month", rec.charge_month,
        "created_at", _num(rec.created_at),
        "updated_at", _num(rec.updated_at),
        "active", _flag(rec.active),
        "settled", _flag(rec.settled),
        "timed_out", _flag(rec.timed_out),
        "deleted", _flag(rec.deleted),
        "next_poll_at", _num(rec.next_poll_at),
        "upd", _updated_at(rec.task),
    ]  # fmt: skip
    for key, value in rec.meta.items():
        fields += [f"m:{key}", orjson.dumps(value).decode()]
    return orjson.dumps(fields)


def _updated_at(task: dict[str, Any]) -> str:
    """The upstream's updatedAt, compared as a string to order same-status updates."""
    return str(task.get("updatedAt") or "")


def _meta_fields(meta: dict[str, Any]) -> list[str | bytes]:
    out: list[str | bytes] = []
    for key, value in meta.items():
        out += [f"m:{key}", orjson.dumps(value)]
    return out


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
    )


def _records(replies: list[Any]) -> list[TaskRecord]:
    return [r for r in (_record(x) for x in replies) if r is not None]


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


def _tightest(infos: list[RateInfo]) -> RateInfo | None:
    """The bucket closest to refusing: fewest whole tokens left (requests first on a tie)."""
    return min(infos, key=lambda i: i.remaining) if infos else None


def _retry_after(limit: str, buckets: dict[str, tuple[float, int | None]], now: float) -> float:
    """When a refused create could succeed: the bucket's next token, the next UTC day or
    month; a full max_active_tasks has no known end, so one second (as SQLiteStore)."""
    if limit in buckets:
        level, cap = buckets[limit]
        return bucket_retry_after(level, cap or 1)
    if limit == "max_active_tasks":
        return 1.0
    if limit == "credits_per_month":
        return seconds_to_next_month(now)
    return seconds_to_next_day(now)


def split_prefix(url: str) -> tuple[str, str | None]:
    """Take a `prefix=` query parameter out of a store URL (`redis://h:6379/0?prefix=gw:`),
    so `[store] url` alone can namespace a deployment."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefixes = [v for k, v in query if k == "prefix"]
    if not prefixes:
        return url, None
    rest = urlencode([(k, v) for k, v in query if k != "prefix"])
    return urlunsplit(parts._replace(query=rest)), prefixes[-1]


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
        reg = self._r.register_script
        self._admit = reg(LUA_ADMIT)
        self._take_request = reg(LUA_TAKE_REQUEST)
        self._settle = reg(LUA_SETTLE_NOT_CREATED)
        self._mark_unknown = reg(LUA_MARK_UNKNOWN)
        self._apply = reg(LUA_APPLY_UPDATE)
        self._get_tid = reg(LUA_GET_BY_TASK_ID)
        self._read_task = reg(LUA_READ_TASK)
        self._list = reg(LUA_LIST)
        self._hide = reg(LUA_HIDE)
        self._set_meta = reg(LUA_SET_META)
        self._claim_poll = reg(LUA_CLAIM_POLL)
        self._claim_due = reg(LUA_CLAIM_DUE_POLLS)
        self._expire = reg(LUA_EXPIRE)
        self._claim_wh = reg(LUA_CLAIM_WEBHOOKS)
        self._finish_wh = reg(LUA_FINISH_WEBHOOK)
        self._idem_begin = reg(LUA_IDEM_BEGIN)
        self._idem_finish = reg(LUA_IDEM_FINISH)
        self._idem_bind = reg(LUA_IDEM_BIND)
        self._secret = reg(LUA_SECRET)

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
        also makes the client drop that connection and reconnect (see redis_client)."""
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
    async def take_request(self, tenant_id: str, limits: Limits, now: float) -> Admission:
        cap = limits.requests_per_minute
        if cap is None:
            return Admission(ok=True)
        ok, level_s = await self._take_request(keys=[self._k("q", tenant_id)], args=[self.prefix, _num(now), str(cap)])
        level = float(level_s)
        info = bucket_info(level, cap)
        if ok:
            return Admission(ok=True, rate=info)
        return Admission(ok=False, limit="requests_per_minute", retry_after=bucket_retry_after(level, cap), rate=info)

    async def admit_create(self, tenant_id: str, limits: Limits, charge: Charge, reservation: TaskRecord, now: float) -> Admission:
        # The periods are the caller's clock's, as in SQLiteStore (charge.day == day_key(now)
        # when the caller built it from the same `now`); the reservation records them.
        day, month = day_key(now), month_key(now)
        reservation.charge_day, reservation.charge_month, reservation.credits = day, month, charge.credits
        args: list[str | bytes] = [
            self.prefix, tenant_id, _num(now),
            *(str(getattr(limits, name) or 0) for name in ALL_LIMITS),
            str(charge.credits), day, month, reservation.rid, _record_blob(reservation),
        ]  # fmt: skip
        ok, failed, rpm_level, tpm_level = await self._admit(keys=[self._k("q", tenant_id)], args=args)
        # Bucket levels after the take (admitted) or as they stand (refused: nothing taken).
        buckets = {
            "requests_per_minute": (float(rpm_level), limits.requests_per_minute),
            "tasks_per_minute": (float(tpm_level), limits.tasks_per_minute),
        }
        rate = _tightest([bucket_info(level, cap) for level, cap in buckets.values() if cap is not None])
        if ok:
            return Admission(ok=True, rate=rate)
        limit = ALL_LIMITS[int(failed) - 1]
        return Admission(ok=False, limit=limit, retry_after=_retry_after(limit, buckets, now), rate=rate)

    async def settle_not_created(self, rid: str, now: float) -> bool:
        args = [self.prefix, rid, day_key(now), month_key(now)]
        return bool(await self._settle(keys=[self._k("t", rid)], args=args))

    async def mark_unknown(self, rid: str, now: float) -> None:
        await self._mark_unknown(keys=[self._k("t", rid)], args=[self.prefix, _num(now), rid])

    async def apply_update(
        self, rid: str, tenant_id: str, task: dict[str, Any], now: float, *, refund_failed: bool, adopt: TaskRecord | None = None
    ) -> UpdateResult:
        status = str(task.get("status") or "")
        task_json = orjson.dumps(task)
        body = b'{"task":' + task_json + b"}"  # == orjson.dumps({"task": task}), one encode
        adopt_blob = self._adoption(adopt, rid, tenant_id, now) if adopt is not None else b""
        task_id = task.get("id")
        args: list[str | bytes] = [
            self.prefix, rid, tenant_id, task_json, status, str(status_rank(status)),
            _flag(refund_failed), f"evt_{uuid.uuid4().hex}", body, _num(now),
            str(task_id) if task_id else "", _num(self.terminal_ttl),
            _updated_at(task), day_key(now), month_key(now),
            adopt_blob,
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

    async def read_task(self, tenant_id: str, limits: Limits, task_id: str, now: float) -> tuple[Admission, TaskRecord | None]:
        cap = limits.requests_per_minute
        args = [self.prefix, _num(now), str(cap or 0), task_id]
        ok, level_s, blob = await self._read_task(keys=[self._k("q", tenant_id)], args=args)
        if cap is None:
            admission = Admission(ok=True)
        else:
            level = float(level_s)
            info = bucket_info(level, cap)
            if not ok:
                return Admission(False, "requests_per_minute", bucket_retry_after(level, cap), info), None
            admission = Admission(ok=True, rate=info)
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
            args=[self.prefix, tenant_id, str(max(0, limit)), after or "", status or "", "asc" if order == "asc" else "desc"],
        )
        return _records(reply[1:]), bool(reply[0])

    async def hide_task(self, tenant_id: str, task_id: str) -> bool:
        return bool(await self._hide(args=[self.prefix, tenant_id, task_id]))

    async def set_meta(self, rid: str, meta: dict[str, Any]) -> None:
        if meta:
            await self._set_meta(keys=[self._k("t", rid)], args=[self.prefix, *_meta_fields(meta)])

    async def usage(self, tenant_id: str, now: float) -> Usage:
        (day, tasks, credits, month, mcredits), active = await asyncio.gather(  # one write: auto-pipelined
            self._r.execute("HMGET", self._k("q", tenant_id), "day", "day_tasks", "day_credits", "month", "month_credits"),
            self._r.execute("HGET", self._k("act"), tenant_id),
        )
        today = _s(day) == day_key(now)
        this_month = _s(month) == month_key(now)
        return Usage(
            active=int(active or 0),
            tasks_today=int(tasks or 0) if today else 0,
            credits_today=int(credits or 0) if today else 0,
            credits_this_month=int(mcredits or 0) if this_month else 0,
        )

    async def active_by_tenant(self) -> dict[str, int]:
        h = _pairs(await self._r.execute("HGETALL", self._k("act")))
        return {k: int(v) for k, v in h.items() if int(v) > 0}

    async def webhook_pending(self) -> int:
        return max(0, int(await self._r.execute("GET", self._k("whn")) or 0))

    # polling and timeouts --------------------------------------------------------------
    async def claim_poll(self, rid: str, now: float, interval: float) -> bool:
        args = [self.prefix, _num(now), _num(now + interval), rid]
        return bool(await self._claim_poll(keys=[self._k("t", rid)], args=args))

    async def claim_due_polls(self, now: float, interval: float, limit: int, timed_out_interval: float, give_up_after: float) -> list[TaskRecord]:
        if limit <= 0:
            return []
        args = [self.prefix, _num(now), _num(interval), str(limit), _num(timed_out_interval), _num(now - give_up_after)]
        return _records(await self._claim_due(keys=[self._k("polls")], args=args))

    async def expire_tasks(self, now: float, timeout: float, unknown_timeout: float) -> list[TaskRecord]:
        args = [self.prefix, _num(now), _num(now - timeout), _num(self.terminal_ttl), _num(now - unknown_timeout)]
        return _records(await self._expire(keys=[self._k("actz")], args=args))

    # webhook outbox --------------------------------------------------------------------
    async def claim_webhooks(self, now: float, limit: int, lease: float) -> list[WebhookEvent]:
        if limit <= 0:
            return []
        reply = await self._claim_wh(keys=[self._k("whdue")], args=[self.prefix, _num(now), str(limit), _num(now + lease)])
        return [_event(eid, flat) for eid, flat in reply]

    async def finish_webhook(self, event_id: str, *, delivered: bool, attempts: int, next_at: float | None) -> None:
        outcome = "delivered" if delivered else ("retry" if next_at is not None else "dead")
        args = [self.prefix, event_id, outcome, str(attempts), _num(next_at or 0.0), _num(self.dead_ttl)]
        await self._finish_wh(keys=[self._k("wh", event_id)], args=args)

    # idempotency -----------------------------------------------------------------------
    async def idem_begin(self, tenant_id: str, key: str, fingerprint: str, now: float, lease: float) -> IdempotencyResult:
        reply = await self._idem_begin(keys=[self._idem_key(tenant_id, key)], args=[self.prefix, fingerprint, _num(now), _num(lease)])
        state = _s(reply[0])
        if state == "unknown":
            return IdempotencyResult(state=state, rid=_s(reply[1]))
        if state != "replay":
            return IdempotencyResult(state=state)
        status, headers, body = reply[1:]
        return IdempotencyResult(state="replay", response=StoredResponse(int(status), orjson.loads(headers), bytes(body)))

    async def idem_finish(self, tenant_id: str, key: str, response: StoredResponse | None, now: float, ttl: float) -> None:
        if response is None:
            args: list[str | bytes] = [self.prefix, _num(now), _num(ttl), "", "", b""]
        else:
            args = [self.prefix, _num(now), _num(ttl), str(response.status), orjson.dumps(response.headers), response.body]
        await self._idem_finish(keys=[self._idem_key(tenant_id, key)], args=args)

    async def idem_bind(self, tenant_id: str, key: str, rid: str, now: float, ttl: float) -> None:
        await self._idem_bind(keys=[self._idem_key(tenant_id, key)], args=[self.prefix, _num(now), _num(ttl), rid])
