-- ARGV: P -> each of the tenant's keys (KEYS[1] = tkeys:{tenant}) as JSON pairs, newest first
local out = {}
for _, id in ipairs(redis.call('ZREVRANGE', KEYS[1], 0, -1)) do
  local h = redis.call('HGETALL', ARGV[1] .. 'key:' .. id)
  if #h > 0 then out[#out + 1] = cjson.encode(h) end
end
return out
