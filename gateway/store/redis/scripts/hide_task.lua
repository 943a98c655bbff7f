-- include: lib.lua
-- ARGV: P, tenant, task_id -> 1 when hidden now
local rid = redis.call('GET', P .. 'tid:' .. ARGV[3])
if not rid then return 0 end
local r = redis.call('HMGET', tkey(rid), 'tenant_id', 'deleted')
if r[1] ~= ARGV[2] or r[2] == '1' then return 0 end
redis.call('HSET', tkey(rid), 'deleted', '1')
redis.call('ZREM', P .. 'tt:' .. ARGV[2], rid)
return 1
