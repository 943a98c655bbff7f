-- ARGV: P, now, rid
local r = redis.call('HMGET', KEYS[1], 'status', 'created_at', 'active')
if r[1] == 'SUBMITTING' then
  redis.call('HSET', KEYS[1], 'status', 'UNKNOWN', 'updated_at', ARGV[2])
  if r[3] == '1' then redis.call('ZADD', ARGV[1] .. 'unkz', r[2], ARGV[3]) end
  return 1
end
return 0
