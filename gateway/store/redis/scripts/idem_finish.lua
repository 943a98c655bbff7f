-- ARGV: P, now, ttl, status, headers, body   (status '' = free the key)
local k = KEYS[1]
if ARGV[4] == '' then
  if redis.call('HGET', k, 'state') == 'pending' then redis.call('DEL', k) end
  return 1
end
if redis.call('EXISTS', k) == 0 then return 0 end
local ttl = tonumber(ARGV[3])
redis.call('HSET', k, 'state', 'done', 'exp', string.format('%.17g', tonumber(ARGV[2]) + ttl),
  'status', ARGV[4], 'headers', ARGV[5], 'body', ARGV[6])
redis.call('PEXPIRE', k, math.max(1, math.ceil(ttl * 1000)))
return 1
