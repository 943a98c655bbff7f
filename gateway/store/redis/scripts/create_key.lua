-- include: lib.lua
-- ARGV: P, key id, tenant id, created_at, fields (JSON pairs), audit (5)
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.error_reply('ERR key id exists: ' .. ARGV[2]) end
hset_flat(KEYS[1], ARGV[5])
redis.call('SADD', P .. 'keys', ARGV[2])
redis.call('ZADD', P .. 'tkeys:' .. ARGV[3], ARGV[4], ARGV[2])
directory_changed(6)
return 1
