-- ARGV: P, now, limit, lease end -> {event hash...}
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
