-- ARGV: P, now, next_poll_at
local r = redis.call('HMGET', KEYS[1], 'next_poll_at', 'status')
if not r[1] then return 0 end
if r[2] == 'SUCCEEDED' or r[2] == 'FAILED' or r[2] == 'CANCELLED' then return 0 end
if tonumber(r[1]) > tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'next_poll_at', ARGV[3])
redis.call('ZADD', ARGV[1] .. 'polls', 'XX', ARGV[3], ARGV[4])
return 1
