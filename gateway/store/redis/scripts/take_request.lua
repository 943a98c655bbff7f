-- include: lib.lua
-- ARGV: P, now, capacity -> {ok, level}
local q = KEYS[1]
local now, cap = tonumber(ARGV[2]), tonumber(ARGV[3])
local level, ts = bucket_level(q, 'rpm', cap, now)
if level < 1.0 then return {0, fmt(level)} end
bucket_store(q, 'rpm', level - 1.0, ts, now)
return {1, fmt(level - 1.0)}
