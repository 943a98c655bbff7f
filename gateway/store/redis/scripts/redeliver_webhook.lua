-- include: lib.lua
-- KEYS: wh:{event_id}. ARGV: P, event_id, now, the event's tenant (read by the caller: it
-- never changes), audit (5) -> {0} unknown | {1, redelivered 0|1, entry (outbox_entry)}
local eid, now, tenant = ARGV[2], ARGV[3], ARGV[4]
local ek = KEYS[1]
local r = redis.call('HMGET', ek, 'state', 'rid', 'tenant_id')
if not r[1] or r[3] ~= tenant then return {0} end
if r[1] ~= 'dead' then return {1, 0, outbox_entry(eid)} end
local rid = r[2]
local q = P .. 'whq:' .. rid
redis.call('HSET', ek, 'state', 'pending', 'attempts', 0, 'next_at', now)
redis.call('HDEL', ek, 'last_error')
redis.call('PERSIST', ek)
index_dead(eid, tenant, false)
redis.call('INCR', P .. 'whn')
if not redis.call('LPOS', q, eid) then
  -- died under an older gateway, which took dead events out of their queue: it goes back
  -- first (the events still queued came after it)
  local head = redis.call('LINDEX', q, 0)
  if head then redis.call('ZREM', P .. 'whdue', head) end
  redis.call('LPUSH', q, eid)
  index_event(eid, tenant)
end
if redis.call('LINDEX', q, 0) == eid then
  redis.call('ZADD', P .. 'whdue', now, eid)
end
append_audit(5)
return {1, 1, outbox_entry(eid)}
