-- include: lib.lua
-- ARGV: P, now, capacity (0 = unlimited), task_id, key id ('' = none), key capacity (0 = none)
-- -> {ok, level, key level, refused by the key's bucket, record JSON or ''}
-- A status poll: LUA_TAKE_REQUEST, then LUA_GET_BY_TASK_ID when admitted (Store.read_task).
local now = tonumber(ARGV[2])
local ok, level, klevel, by_key = take_rpm(KEYS[1], tonumber(ARGV[3]), P .. 'kq:' .. ARGV[5], tonumber(ARGV[6]), now)
if ok == 0 then return {0, fmt(level), fmt(klevel), by_key, ''} end
local rid = redis.call('GET', P .. 'tid:' .. ARGV[4])
if not rid then return {1, fmt(level), fmt(klevel), 0, ''} end
return {1, fmt(level), fmt(klevel), 0, record_json(rid)}
