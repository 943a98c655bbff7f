-- include: lib.lua
-- KEYS: the index to walk (audz, audt:{tenant} or auda:{action}). ARGV: P, limit, after
-- (entry id, '' = from the newest), tenant filter, action filter ('' = any)
-- -> {has_more, entry JSON...}, newest first (time, then id, descending)
local z = KEYS[1]
local limit, after, want_tenant, want_action = tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5]
local c_score, c_id = nil, nil
if after ~= '' then
  local t = redis.call('HGET', P .. 'aud:' .. after, 't')
  if not t then return {0} end
  c_score, c_id = tonumber(t), after
end

local function past_cursor(score, id)
  if not c_score or score ~= c_score then return true end
  return lt(id, c_id)
end

local out, stale = {0}, {}
local offset, batch, found = 0, 100, 0
while found <= limit do
  local page = redis.call('ZREVRANGEBYSCORE', z, c_score and fmt(c_score) or '+inf', '-inf', 'WITHSCORES', 'LIMIT', offset, batch)
  if #page == 0 then break end
  offset = offset + batch
  for i = 1, #page, 2 do
    local id, score = page[i], tonumber(page[i + 1])
    if past_cursor(score, id) then
      local e = redis.call('HMGET', P .. 'aud:' .. id, 'j', 'ten', 'a')
      if not e[1] then
        stale[#stale + 1] = id
      elseif (want_tenant == '' or e[2] == want_tenant) and (want_action == '' or e[3] == want_action) then
        found = found + 1
        if found > limit then out[1] = 1 break end
        out[#out + 1] = e[1]
      end
    end
  end
end
if #stale > 0 then redis.call('ZREM', z, unpack(stale)) end
return out
