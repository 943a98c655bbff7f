-- include: lib.lua
-- ARGV: P, now, limit, lease end -> {event hash...}
-- whdue holds the head of each task's queue: a pending head at its next_at, a dead head
-- (which holds its task's later events back) at the end of its retention, when it is
-- dropped here and the task's next event becomes the head, claimable in this same call.
local z, now, limit = P .. 'whdue', ARGV[2], tonumber(ARGV[3])
local out = {}
local again = true
while again and #out < limit do
  again = false  -- a claimed event's score moves to its lease end: it is not seen twice
  local due = redis.call('ZRANGEBYSCORE', z, '-inf', now, 'LIMIT', 0, limit - #out)
  for _, eid in ipairs(due) do
    local ek = P .. 'wh:' .. eid
    local h = redis.call('HGETALL', ek)
    if #h == 0 then
      redis.call('ZREM', z, eid)
      again = true
    else
      local e = redis.call('HMGET', ek, 'state', 'rid', 'tenant_id')
      if e[1] == 'dead' then
        drop_event(eid, e[2], e[3])
        again = true
      else
        redis.call('ZADD', z, ARGV[4], eid)
        out[#out + 1] = {eid, h}
      end
    end
  end
end
return out
