-- include: lib.lua
-- ARGV: P, tenant, limit, after task id, status filter, order -> {has_more, record...}
local z = KEYS[1]
local tenant, limit, after, want, desc = ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5], ARGV[6] == 'desc'
local c_score, c_rid = nil, nil
if after ~= '' then
  local arid = redis.call('GET', P .. 'tid:' .. after)
  if not arid then return {0} end
  local a = redis.call('HMGET', tkey(arid), 'tenant_id', 'created_at')
  if a[1] ~= tenant then return {0} end
  c_score, c_rid = tonumber(a[2]), arid
end

-- Is (score, rid) strictly after the cursor in the listing order?
local function past_cursor(score, rid)
  if not c_score then return true end
  if score ~= c_score then return true end
  if desc then return lt(rid, c_rid) else return lt(c_rid, rid) end
end

local out, stale = {0}, {}
local offset, batch = 0, 100
local found = 0
while found <= limit do
  local page
  if desc then
    page = redis.call('ZREVRANGEBYSCORE', z, c_score and fmt(c_score) or '+inf', '-inf', 'WITHSCORES', 'LIMIT', offset, batch)
  else
    page = redis.call('ZRANGEBYSCORE', z, c_score and fmt(c_score) or '-inf', '+inf', 'WITHSCORES', 'LIMIT', offset, batch)
  end
  if #page == 0 then break end
  offset = offset + batch
  for i = 1, #page, 2 do
    local rid, score = page[i], tonumber(page[i + 1])
    if past_cursor(score, rid) then
      local st = redis.call('HMGET', tkey(rid), 'status', 'deleted')
      if not st[1] then
        stale[#stale + 1] = rid
      elseif st[2] ~= '1' and (want == '' or st[1] == want) then
        found = found + 1
        if found > limit then out[1] = 1 break end
        out[#out + 1] = record_json(rid)
      end
    end
  end
end
if #stale > 0 then redis.call('ZREM', z, unpack(stale)) end
return out
