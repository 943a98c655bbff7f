-- include: lib.lua
-- ARGV: P, event_id, outcome (delivered|retry|dead), attempts, next_at, dead_ttl
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
