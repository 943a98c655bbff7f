-- include: lib.lua
-- ARGV: P, event_id, outcome (delivered|retry|dead), attempts, next_at, dead_ttl, now,
-- last error ('' = none)
local eid, outcome, attempts, err = ARGV[2], ARGV[3], ARGV[4], ARGV[8]
local ek = P .. 'wh:' .. eid
local r = redis.call('HMGET', ek, 'state', 'rid', 'tenant_id')
if r[1] ~= 'pending' then return 0 end
local rid, tenant = r[2], r[3]
if err == '' then redis.call('HDEL', ek, 'last_error') else redis.call('HSET', ek, 'last_error', err) end
if outcome == 'retry' then
  redis.call('HSET', ek, 'attempts', attempts, 'next_at', ARGV[5])
  if redis.call('LINDEX', P .. 'whq:' .. rid, 0) == eid then
    redis.call('ZADD', P .. 'whdue', ARGV[5], eid)
  end
  return 1
end
local n = redis.call('DECR', P .. 'whn')
if n < 0 then redis.call('SET', P .. 'whn', 0) end
if outcome == 'delivered' then
  drop_event(eid, rid, tenant)
else
  -- dead: it stays the head of its task's queue, so the later events wait behind it, and
  -- in whdue until its retention ends (claim_webhooks drops it then); next_at = its death
  local now = tonumber(ARGV[7])
  redis.call('HSET', ek, 'attempts', attempts, 'state', 'dead', 'next_at', ARGV[7])
  redis.call('ZADD', P .. 'whdue', fmt(now + tonumber(ARGV[6])), eid)
  index_dead(eid, tenant, true)
end
return 1
