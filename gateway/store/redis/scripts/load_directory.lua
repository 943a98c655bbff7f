-- ARGV: P -> {version, {tenant JSON pairs...}, {key JSON pairs...}}, read in one step
local P = ARGV[1]
local function records(set, prefix)
  local out = {}
  for _, id in ipairs(redis.call('SMEMBERS', set)) do
    local h = redis.call('HGETALL', prefix .. id)
    if #h > 0 then out[#out + 1] = cjson.encode(h) end
  end
  return out
end
return {redis.call('GET', P .. 'dirv') or '0', records(P .. 'tens', P .. 'ten:'), records(P .. 'keys', P .. 'key:')}
