-- ARGV: P, now, ttl, rid   (only a key still pending: its holder's attempt)
local k = KEYS[1]
if redis.call('HGET', k, 'state') ~= 'pending' then return 0 end
local ttl = tonumber(ARGV[3])
redis.call('HSET', k, 'state', 'unknown', 'rid', ARGV[4], 'exp', string.format('%.17g', tonumber(ARGV[2]) + ttl))
redis.call('PEXPIRE', k, math.max(1, math.ceil(ttl * 1000)))
return 1
