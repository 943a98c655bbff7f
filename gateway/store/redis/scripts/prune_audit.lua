-- ARGV: P, before -> how many entries older than `before` were deleted (with their index entries)
local P = ARGV[1]
local n = 0
while true do
  local ids = redis.call('ZRANGEBYSCORE', P .. 'audz', '-inf', '(' .. ARGV[2], 'LIMIT', 0, 500)
  if #ids == 0 then break end
  for _, id in ipairs(ids) do
    local k = P .. 'aud:' .. id
    local v = redis.call('HMGET', k, 'ten', 'a')
    if v[1] and v[1] ~= '' then redis.call('ZREM', P .. 'audt:' .. v[1], id) end
    if v[2] then redis.call('ZREM', P .. 'auda:' .. v[2], id) end
    redis.call('DEL', k)
    n = n + 1
  end
  redis.call('ZREM', P .. 'audz', unpack(ids))
end
return n
