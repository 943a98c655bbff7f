-- include: lib.lua
-- ARGV: P, now, capacity (0 = unlimited), task_id -> {ok, level, record JSON or ''}
-- A status poll: LUA_TAKE_REQUEST, then LUA_GET_BY_TASK_ID when admitted (Store.read_task).
local q = KEYS[1]
local now, cap = tonumber(ARGV[2]), tonumber(ARGV[3])
local level = 0
if cap > 0 then
  local ts
  level, ts = bucket_level(q, 'rpm', cap, now)
  if level < 1.0 then return {0, fmt(level), ''} end
  level = level - 1.0
  bucket_store(q, 'rpm', level, ts, now)
end
local rid = redis.call('GET', P .. 'tid:' .. ARGV[4])
if not rid then return {1, fmt(level), ''} end
return {1, fmt(level), record_json(rid)}
