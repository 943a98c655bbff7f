-- include: lib.lua
-- KEYS: the index to walk (whl, whlt:{tenant}, whd or whdt:{tenant}). ARGV: P, limit,
-- after (event id, '' = from the newest), state filter ('' = any)
-- -> {has_more, entry...} (outbox_entry), newest first (event ids descending)
local z = KEYS[1]
local limit, want = tonumber(ARGV[2]), ARGV[4]
local max = ARGV[3] ~= '' and ('(' .. ARGV[3]) or '+'
local out, stale, found = {0}, {}, 0
while found <= limit do
  local page = redis.call('ZREVRANGEBYLEX', z, max, '-', 'LIMIT', 0, 100)
  if #page == 0 then break end
  for _, eid in ipairs(page) do
    max = '(' .. eid
    local e = outbox_entry(eid)
    if not e then
      stale[#stale + 1] = eid
    elseif want == '' or e[6] == want then
      found = found + 1
      if found > limit then out[1] = 1 break end
      out[#out + 1] = e
    end
  end
end
if #stale > 0 then redis.call('ZREM', z, unpack(stale)) end
return out
