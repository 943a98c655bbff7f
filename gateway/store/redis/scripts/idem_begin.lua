-- ARGV: P, fingerprint, now, lease, orphan keep seconds
-- -> {state, status, headers, body} | {'unknown', rid}
-- A pending key past its lease with a rid (admitted, then its holder vanished) binds to
-- that rid for `orphan keep` seconds from its lease's end: rules.orphaned_idempotency.
local k = KEYS[1]
local now = tonumber(ARGV[3])
local h = redis.call('HMGET', k, 'state', 'fp', 'exp', 'status', 'headers', 'body', 'rid')
local keep = tonumber(ARGV[5])
local orphan = h[1] == 'pending' and h[7] and h[7] ~= '' and tonumber(h[3]) <= now
  and now < tonumber(h[3]) + keep
if h[1] and (tonumber(h[3]) > now or orphan) then
  if h[2] ~= ARGV[2] then return {'conflict'} end
  if orphan then
    local exp = tonumber(h[3]) + keep
    redis.call('HSET', k, 'state', 'unknown', 'exp', string.format('%.17g', exp))
    redis.call('PEXPIRE', k, math.max(1, math.ceil((exp - now) * 1000)))
    return {'unknown', h[7]}
  end
  if h[1] == 'pending' then return {'pending'} end
  if h[1] == 'unknown' then return {'unknown', h[7]} end
  return {'replay', h[4], h[5], h[6]}
end
redis.call('DEL', k)
local lease = tonumber(ARGV[4])
redis.call('HSET', k, 'state', 'pending', 'fp', ARGV[2], 'exp', string.format('%.17g', now + lease))
redis.call('PEXPIRE', k, math.max(1, math.ceil(lease * 1000)))
return {'new'}
