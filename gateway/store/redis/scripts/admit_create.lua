-- include: lib.lua
-- ARGV: P, tenant, now, rpm, tpm, max_active, tasks_day, credits_day, credits_month,
--       credits, day, month, rid, record JSON, key id ('' = none), ledger ttl ms,
--       idempotency key's hash name ('' = none), orphan keep seconds,
--       key limited ('1': the key's own six limits follow, checked and charged too),
--       key rpm, tpm, max_active, tasks_day, credits_day, credits_month
--       (limit 0 = unlimited)
-- -> {ok, index of the failing limit (1-based: 1-6 the tenant's in ALL_LIMITS order,
--     7-12 the key's), rpm level, tpm level, key rpm level, key tpm level,
--     day and month charged}
-- rules.check_create and rules.budget_exceeded, then rules.charge and rules.book_charge.
local q = KEYS[1]
local tenant = ARGV[2]
local now = tonumber(ARGV[3])
local credits, day, month, rid = tonumber(ARGV[10]), ARGV[11], ARGV[12], ARGV[13]
local names = {'rpm', 'tpm'}

-- the quotas checked, in order: the tenant's, then (key limited) the key's
local quotas = {{q = q, first = 4, base = 0, active = function()
  return tonumber(redis.call('HGET', P .. 'act', tenant) or '0')
end}}
if ARGV[19] == '1' then
  local kq = P .. 'kq:' .. ARGV[15]
  quotas[2] = {q = kq, first = 20, base = 6, active = function()
    return tonumber(redis.call('HGET', kq, 'active') or '0')
  end}
end

local function used(qk, period_field, key, counter)
  local v = redis.call('HMGET', qk, period_field, counter)
  if v[1] and not lt(v[1], key) then return tonumber(v[2]) or 0 end
  return 0
end

local failed = 0
local levels = {-1, -1, -1, -1}
local stamps = {now, now, now, now}
for j, Q in ipairs(quotas) do
  local a = Q.first
  local caps = {tonumber(ARGV[a]), tonumber(ARGV[a + 1])}
  Q.caps = caps
  for i = 1, 2 do
    local n = (j - 1) * 2 + i
    if caps[i] > 0 then
      levels[n], stamps[n] = bucket_level(Q.q, names[i], caps[i], now)
      if failed == 0 and levels[n] < 1.0 then failed = Q.base + i end
    end
  end
  local max_active = tonumber(ARGV[a + 2])
  local tasks_day, credits_day, credits_month = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
  if failed == 0 and max_active > 0 and Q.active() >= max_active then failed = Q.base + 3 end
  if failed == 0 and tasks_day > 0 and used(Q.q, 'day', day, 'day_tasks') + 1 > tasks_day then failed = Q.base + 4 end
  if failed == 0 and credits_day > 0 and used(Q.q, 'day', day, 'day_credits') + credits > credits_day then
    failed = Q.base + 5
  end
  if failed == 0 and credits_month > 0 and used(Q.q, 'month', month, 'month_credits') + credits > credits_month then
    failed = Q.base + 6
  end
end

if failed ~= 0 then
  return {0, failed, fmt(levels[1]), fmt(levels[2]), fmt(levels[3]), fmt(levels[4])}
end

for j, Q in ipairs(quotas) do
  for i = 1, 2 do
    local n = (j - 1) * 2 + i
    if Q.caps[i] > 0 then
      levels[n] = levels[n] - 1.0
      bucket_store(Q.q, names[i], levels[n], stamps[n], now)
    end
  end
end
local cday, cmonth = charge(q, day, month, 1, credits)
write_record(rid, ARGV[14])
if cday ~= day or cmonth ~= month then
  redis.call('HSET', tkey(rid), 'charge_day', cday, 'charge_month', cmonth)
end
if quotas[2] then
  charge(quotas[2].q, day, month, 1, credits)
  redis.call('HINCRBY', quotas[2].q, 'active', 1)
  redis.call('HSET', tkey(rid), 'key_limited', '1')
end
index_record(rid)
book_charge(cday, tenant, ARGV[15], credits, 1, ARGV[16])
-- the held Idempotency-Key names this reservation, and outlives its lease if the holder
-- vanishes (idem_begin binds it then; store.base.Store.admit_create)
local idem = ARGV[17]
if idem ~= '' and redis.call('HGET', idem, 'state') == 'pending' then
  redis.call('HSET', idem, 'rid', rid)
  local lease_end = tonumber(redis.call('HGET', idem, 'exp'))
  redis.call('PEXPIRE', idem, math.max(1, math.ceil((lease_end - now + tonumber(ARGV[18])) * 1000)))
end
return {1, 0, fmt(levels[1]), fmt(levels[2]), fmt(levels[3]), fmt(levels[4]), cday, cmonth}
