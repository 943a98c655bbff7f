-- include: lib.lua
-- ARGV: P, rid, today, this month, ledger ttl ms -> 1 when the reservation was settled and
-- removed (rules.uncharge and rules.book_not_created)
local rid = ARGV[2]
local k = KEYS[1]
local r = redis.call('HMGET', k, 'status', 'settled', 'active', 'tenant_id', 'credits', 'charge_day', 'charge_month', 'task_id', 'key_id', 'key_limited', 'relay')
local status, settled, active, tenant = r[1], r[2], r[3], r[4]
if not status then return 0 end
if (status ~= 'SUBMITTING' and status ~= 'UNKNOWN') or settled == '1' then return 0 end
local kq = key_quota_of(r[9], r[10])
if active == '1' then
  decr_floor(P .. 'act', tenant, 1)
  if kq then decr_floor(kq, 'active', 1) end
end
refund(P .. 'q:' .. tenant, r[6], r[7], ARGV[3], ARGV[4], 1, tonumber(r[5]) or 0)
if kq then refund(kq, r[6], r[7], ARGV[3], ARGV[4], 1, tonumber(r[5]) or 0) end
book_charge(r[6], tenant, r[9] or '', tonumber(r[5]) or 0, -1, ARGV[5], r[11])
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
