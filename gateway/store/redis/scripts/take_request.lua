-- include: lib.lua
-- ARGV: P, now, capacity (0 = unlimited), key id ('' = none), key capacity (0 = none)
-- -> {ok, level, key level, refused by the key's bucket} (take_rpm: rules.take_requests)
local now = tonumber(ARGV[2])
local ok, level, klevel, by_key = take_rpm(KEYS[1], tonumber(ARGV[3]), P .. 'kq:' .. ARGV[4], tonumber(ARGV[5]), now)
return {ok, fmt(level), fmt(klevel), by_key}
