-- ARGV: P, fingerprint, now, lease -> {state, status, headers, body} | {'unknown', rid}
local k = KEYS[1]
local now = tonumber(ARGV[3])
local h = redis.call('HMGET', k, 'state', 'fp', 'exp', 'status', 'headers', 'body', 'rid')
if h[1] and tonumber(h[3]) > now then
  if h[2] ~= ARGV[2] then return {'conflict'} end
  if h[1] == 'pending' then return {'pending'} end
  if h[1] == 'unknown' then return {'unknown', h[7]} end
  return {'replay', h[4], h[5], h[6]}
end
redis.call('DEL', k)
local lease = tonumber(ARGV[4])
redis.call('HSET', k, 'state', 'pending', 'fp', ARGV[2], 'exp', string.format('%.17g', now + lease))
redis.call('PEXPIRE', k, math.max(1, math.ceil(lease * 1000)))
return {'new'}
