-- include: lib.lua
-- ARGV: P, task_id -> record JSON or ''
local rid = redis.call('GET', P .. 'tid:' .. ARGV[2])
if not rid then return '' end
return record_json(rid)
