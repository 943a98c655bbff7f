-- Shared helpers, prepended to every script whose first line is `-- include: lib.lua`.
-- ARGV[1] is always the key prefix. These restate gateway/store/rules.py in Lua and must
-- match it (the contract tests run both stores through the same cases).
local P = ARGV[1]
local TERMINAL = {SUCCEEDED = true, FAILED = true, CANCELLED = true}
local REFUNDABLE = {FAILED = true, CANCELLED = true}

local function fmt(x) return string.format('%.17g', x) end

-- Byte-wise a < b, as SQLite and Python compare (period keys, updatedAt): Lua's `<` on
-- strings uses strcoll, and Redis takes LC_COLLATE from its environment.
local function lt(a, b)
  if a == b then return false end  -- the usual case (today's day key): no byte loop
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end

-- rules.charge with rules.Quota.roll: a period counter moves forward only: a newer period
-- key resets it, an older one (a replica whose clock is behind) is charged to the stored,
-- current period. Returns the day and month charged (the record's charge_day/month).
local function charge(q, day, month, tasks, credits)
  local d = redis.call('HGET', q, 'day')
  if (not d) or lt(d, day) then
    redis.call('HSET', q, 'day', day, 'day_tasks', tasks, 'day_credits', credits)
  else
    redis.call('HINCRBY', q, 'day_tasks', tasks)
    redis.call('HINCRBY', q, 'day_credits', credits)
    day = d
  end
  local m = redis.call('HGET', q, 'month')
  if (not m) or lt(m, month) then
    redis.call('HSET', q, 'month', month, 'month_credits', credits, 'month_tasks', tasks)
  else
    redis.call('HINCRBY', q, 'month_credits', credits)
    redis.call('HINCRBY', q, 'month_tasks', tasks)
    month = m
  end
  return day, month
end

local function decr_floor(key, field, n)
  if n == 0 then return end
  local v = redis.call('HINCRBY', key, field, -n)
  if v < 0 then redis.call('HSET', key, field, 0) end
end

-- rules.refund_credits (and the day's task of rules.uncharge): give back to the periods
-- the charge was made in, only while they are still current
-- (today, this_month: the caller's clock).
local function refund(q, day, month, today, this_month, tasks, credits)
  local v = redis.call('HMGET', q, 'day', 'month')
  if day == today and v[1] == day then
    decr_floor(q, 'day_tasks', tasks)
    decr_floor(q, 'day_credits', credits)
  end
  if month == this_month and v[2] == month then
    decr_floor(q, 'month_tasks', tasks)
    decr_floor(q, 'month_credits', credits)
  end
end

-- The usage ledger (rules.Booking): add to counters of the row (day, tenant, key; '' = no
-- key, relay), kept as fields "tenant<TAB>key<TAB>relay<TAB>counter" of the day's hash
-- {P}led:{day} ("tenant<TAB>key<TAB>counter" for relay '': booked before relays had ids);
-- `counts` is {counter, n, counter, n, ...}. A field back at zero is dropped (a reversed
-- charge leaves no trace); the hash expires `ttl_ms` after its last write
-- (rules.LEDGER_RETENTION_DAYS).
local function book(day, tenant, key, counts, ttl_ms, relay)
  if not day then return end  -- a record without its charge day (never written so): no error
  local k = P .. 'led:' .. day
  local prefix = tenant .. '\t' .. key .. '\t'
  if relay and relay ~= '' then prefix = prefix .. relay .. '\t' end
  local wrote = false
  for i = 1, #counts, 2 do
    local n = counts[i + 1]
    if n ~= 0 then
      local f = prefix .. counts[i]
      if redis.call('HINCRBY', k, f, n) == 0 then redis.call('HDEL', k, f) end
      wrote = true
    end
  end
  if wrote then redis.call('PEXPIRE', k, ttl_ms) end
end

-- rules.book_charge (sign 1) and rules.book_not_created (sign -1).
local function book_charge(day, tenant, key, credits, sign, ttl_ms, relay)
  book(day, tenant, key, {'tasks_created', sign, 'credits_charged', sign * credits}, ttl_ms, relay)
end

local function tkey(rid) return P .. 't:' .. rid end

-- A token bucket's level at `now` (full when new) and its stored time, computed exactly as
-- rules.bucket_take does; bucket_store keeps what is left after a take.
local function bucket_level(q, name, cap, now)
  local v = redis.call('HMGET', q, name .. '_t', name .. '_ts')
  if not v[1] then return cap, now end
  local ts = tonumber(v[2])
  return math.min(cap, tonumber(v[1]) + math.max(0, now - ts) * cap / 60.0), ts
end

local function bucket_store(q, name, level, ts, now)
  redis.call('HSET', q, name .. '_t', fmt(level), name .. '_ts', fmt(math.max(ts, now)))
end

-- rules.take_requests: one requests_per_minute token from the tenant's bucket `q` (cap 0 =
-- unlimited) and the key's `kq` (kcap 0 = none), both or neither -> ok, the two levels
-- (after the take; as they stand when refused), and 1 when the key's bucket refused.
local function take_rpm(q, cap, kq, kcap, now)
  local level, ts, klevel, kts = 0, now, 0, now
  if cap > 0 then level, ts = bucket_level(q, 'rpm', cap, now) end
  if kcap > 0 then klevel, kts = bucket_level(kq, 'rpm', kcap, now) end
  if cap > 0 and level < 1.0 then return 0, level, klevel, 0 end
  if kcap > 0 and klevel < 1.0 then return 0, level, klevel, 1 end
  if cap > 0 then
    level = level - 1.0
    bucket_store(q, 'rpm', level, ts, now)
  end
  if kcap > 0 then
    klevel = klevel - 1.0
    bucket_store(kq, 'rpm', klevel, kts, now)
  end
  return 1, level, klevel, 0
end

-- The release of a task's key quota (contract §15), where its tenant's is released: only
-- for a task admitted under key limits (field key_limited), keyed {P}kq:{key_id}, with
-- its active count in the hash itself (rules.free_slot, rules.refund_credits/uncharge).
local function key_quota_of(key_id, key_limited)
  if key_limited == '1' and key_id and key_id ~= '' then return P .. 'kq:' .. key_id end
  return nil
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

-- The admin listing's indexes (list_webhooks): zsets of event ids at score 0, read in
-- lexical order (ids sort by creation): whl every undelivered event, whd the dead ones,
-- each also per tenant (whlt:{tenant}, whdt:{tenant}).
local function index_event(eid, tenant)
  redis.call('ZADD', P .. 'whl', 0, eid)
  redis.call('ZADD', P .. 'whlt:' .. tenant, 0, eid)
end

local function index_dead(eid, tenant, dead)
  if dead then
    redis.call('ZADD', P .. 'whd', 0, eid)
    redis.call('ZADD', P .. 'whdt:' .. tenant, 0, eid)
  else
    redis.call('ZREM', P .. 'whd', eid)
    redis.call('ZREM', P .. 'whdt:' .. tenant, eid)
  end
end

-- A delivered event, or a dead one past its retention: gone from its task's queue, the
-- schedule and the indexes; the task's next event becomes its head.
local function drop_event(eid, rid, tenant)
  redis.call('LREM', P .. 'whq:' .. rid, 1, eid)
  redis.call('ZREM', P .. 'whdue', eid)
  redis.call('DEL', P .. 'wh:' .. eid)
  redis.call('ZREM', P .. 'whl', eid)
  redis.call('ZREM', P .. 'whlt:' .. tenant, eid)
  index_dead(eid, tenant, false)
  promote_head(rid)
end

-- One event as list_webhooks and redeliver_webhook return it (base.OutboxEntry): id,
-- tenant, rid, task id, seq, state, attempts, next_at, last error, created_at ('' = none);
-- nil when the event is gone.
local function outbox_entry(eid)
  local h = redis.call('HMGET', P .. 'wh:' .. eid, 'tenant_id', 'rid', 'seq', 'state', 'attempts', 'next_at',
    'last_error', 'created_at')
  if not h[1] then return nil end
  local task_id = redis.call('HGET', P .. 't:' .. h[2], 'task_id')
  return {eid, h[1], h[2], task_id or '', h[3], h[4], h[5] or '0', h[6] or '', h[7] or '', h[8] or '0'}
end

-- The directory (tenants, keys, audit). A record is a hash of strings written from a JSON
-- array of field/value pairs (store/directory.py); an audit entry's 5 arguments are its
-- id, time, tenant ('' = none), action and JSON.
local function hset_flat(key, blob)
  local kv = cjson.decode(blob)
  if #kv > 0 then redis.call('HSET', key, unpack(kv)) end
end

local function append_audit(i)
  local id, time, tenant, action = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  redis.call('HSET', P .. 'aud:' .. id, 'j', ARGV[i + 4], 't', time, 'ten', tenant, 'a', action)
  redis.call('ZADD', P .. 'audz', time, id)
  if tenant ~= '' then redis.call('ZADD', P .. 'audt:' .. tenant, time, id) end
  redis.call('ZADD', P .. 'auda:' .. action, time, id)
end

-- Every tenant or key change bumps the version and appends its audit entry (ARGV[i..i+4]).
local function directory_changed(i)
  redis.call('INCR', P .. 'dirv')
  append_audit(i)
end

-- update_tenant / update_key: ARGV P, fields to set (JSON pairs), fields to delete (JSON
-- array), audit (5) -> the record's fields as JSON, or '' (nothing written) when unknown.
local function update_record(key)
  if redis.call('EXISTS', key) == 0 then return '' end
  hset_flat(key, ARGV[2])
  local drop = cjson.decode(ARGV[3])
  if #drop > 0 then redis.call('HDEL', key, unpack(drop)) end
  directory_changed(4)
  return cjson.encode(redis.call('HGETALL', key))
end

-- rotate_key / rotate_webhook_secret (directory.rotated): ARGV P, fields to set (JSON pairs,
-- the new secret), grace end ('' = none), now, audit (5). The secret in the `current` field
-- now moves to `previous` until the grace end, or `previous` and `expires` are deleted; a
-- previous secret still in its own grace joins `earlier` (JSON secret -> end, as strings),
-- whose expired entries are dropped -> the record's fields as JSON, or '' (nothing written)
-- when unknown.
local function rotate_secret(key, current, previous, expires, earlier)
  if redis.call('EXISTS', key) == 0 then return '' end
  local grace, now = ARGV[3], tonumber(ARGV[4])
  local kept, n = {}, 0
  local stored = redis.call('HGET', key, earlier)
  if stored then
    for secret, ends in pairs(cjson.decode(stored)) do
      if tonumber(ends) > now then kept[secret] = ends; n = n + 1 end
    end
  end
  local old, old_end = redis.call('HGET', key, previous), redis.call('HGET', key, expires)
  if old and old ~= '' and old_end and tonumber(old_end) > now then kept[old] = old_end; n = n + 1 end
  if grace == '' then
    redis.call('HDEL', key, previous, expires)
  else
    redis.call('HSET', key, previous, redis.call('HGET', key, current) or '', expires, grace)
  end
  if n > 0 then
    redis.call('HSET', key, earlier, cjson.encode(kept))
  else
    redis.call('HDEL', key, earlier)
  end
  hset_flat(key, ARGV[2])
  directory_changed(5)
  return cjson.encode(redis.call('HGETALL', key))
end
