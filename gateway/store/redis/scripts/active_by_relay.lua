-- include: lib.lua
-- ARGV: P -> flat {relay, count, ...} of the active tasks ({P}actz), '' = before relays had ids.
-- Read only; O(active tasks), for a reload's check, never the request path.
local counts = {}
for _, rid in ipairs(redis.call('ZRANGE', P .. 'actz', 0, -1)) do
  local relay = redis.call('HGET', tkey(rid), 'relay') or ''
  counts[relay] = (counts[relay] or 0) + 1
end
local out = {}
for relay, n in pairs(counts) do
  out[#out + 1] = relay
  out[#out + 1] = n
end
return out
