-- include: lib.lua
-- ARGV: P, tenant id, fields (JSON pairs), audit (5) -> 1 created | 0 the id exists (nothing written)
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
hset_flat(KEYS[1], ARGV[3])
redis.call('SADD', P .. 'tens', ARGV[2])
directory_changed(4)
return 1
