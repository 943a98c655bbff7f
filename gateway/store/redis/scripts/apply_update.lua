-- include: lib.lua
-- ARGV: P, rid, tenant, task_json, status, rank, refund, event_id, body, now, task_id,
--       terminal_ttl, updatedAt, today, this month, adopt record JSON ('' = none),
--       ledger ttl ms
-- -> {found, applied, changed, previous, refunded, finished, event_id, adopted, record}
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
  local a = redis.call('HMGET', k, 'tenant_id', 'credits', 'charge_day', 'charge_month', 'key_id', 'relay')
  local cday, cmonth = charge(P .. 'q:' .. a[1], a[3], a[4], 1, tonumber(a[2]) or 0)
  redis.call('HSET', k, 'charge_day', cday, 'charge_month', cmonth)
  index_record(rid)
  book_charge(cday, a[1], a[5] or '', tonumber(a[2]) or 0, 1, ARGV[17], a[6])
  adopted = 1
end

local r = redis.call('HMGET', k, 'tenant_id', 'status', 'rank', 'active', 'settled', 'credits',
  'charge_day', 'charge_month', 'hook', 'task_id', 'deleted', 'created_at', 'next_poll_at', 'upd', 'key_id',
  'key_limited', 'relay')
if r[1] ~= tenant then return {0} end
local cur = r[2]
-- The compare-and-set (rules.decide_update): no status, anything after a terminal state,
-- a lower rank, or the same status with an older updatedAt is stale.
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
  local kq = key_quota_of(r[15], r[16])
  if r[4] == '1' then
    redis.call('HSET', k, 'active', '0')
    decr_floor(P .. 'act', tenant, 1)
    if kq then decr_floor(kq, 'active', 1) end
    redis.call('ZREM', P .. 'actz', rid)
  end
  redis.call('ZREM', P .. 'polls', rid)
  if r[5] ~= '1' then
    if refund_failed and REFUNDABLE[status] then
      refunded = tonumber(r[6]) or 0
      refund(P .. 'q:' .. tenant, r[7], r[8], today, this_month, 0, refunded)
      if kq then refund(kq, r[7], r[8], today, this_month, 0, refunded) end
    end
    redis.call('HSET', k, 'settled', '1')
  end
  -- rules.book_update: the end on the day it happens, a refund on the charge day
  local key = r[15] or ''
  local ended = status == 'SUCCEEDED' and 'tasks_succeeded' or 'tasks_failed'
  if r[7] == today then
    book(today, tenant, key, {ended, 1, 'credits_refunded', refunded}, ARGV[17], r[17])
  else
    book(today, tenant, key, {ended, 1}, ARGV[17], r[17])
    book(r[7], tenant, key, {'credits_refunded', refunded}, ARGV[17], r[17])
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
  index_event(eid, tenant)
end
if finished == 1 then retain(rid, ARGV[12]) end
return {1, 1, changed and 1 or 0, cur, refunded, finished, eid, adopted, record_json(rid)}
