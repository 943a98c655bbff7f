-- include: lib.lua
-- ARGV: P, now, interval, limit, timed_out_interval, give-up cutoff (now - give_up_after)
-- -> {record...}. Tasks created at or before the cutoff are dropped from the poll index.
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
