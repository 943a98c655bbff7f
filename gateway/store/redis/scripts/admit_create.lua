-- include: lib.lua
-- ARGV: P, tenant, now, rpm, tpm, max_active, tasks_day, credits_day, credits_month,
--       credits, day, month, rid, record JSON, key id ('' = none), ledger ttl ms,
--       idempotency key's hash name ('' = none), orphan keep seconds,
--       key limited ('1': the key's own six limits follow, checked and charged too: §15),
--       key rpm, tpm, max_active, tasks_day, credits_day, credits_month
--       (limit 0 = unlimited)
-- -> {ok, index of the failing limit (1-based, ALL_LIMITS order; 7-12 the key's), rpm level,
--     tpm level, then day and month charged (admitted), then key rpm and tpm levels}
-- rules.check_create and rules.budget_exceeded, then rules.charge and rules.book_charge.
local q = KEYS[1]
local tenant = ARGV[2]
local now = tonumber(ARGV[3])
local caps = {tonumber(ARGV[4]), tonumber(ARGV[5])}
local max_active = tonumber(ARGV[6])
local tasks_day, credits_day, credits_month = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local credits, day, month, rid = tonumber(ARGV[10]), ARGV[11], ARGV[12], ARGV[13]
local names = {'rpm', 'tpm'}

local levels, stamps = {-1, -1}, {now, now}
local failed = 0
for i = 1, 2 do
  if caps[i] > 0 then
    levels[i], stamps[i] = bucket_level(q, names[i], caps[i], now)
    if failed == 0 and levels[i] < 1.0 then failed = i end
  end
end

local function used(period_field, key, counter, qk)
  local v = redis.call('HMGET', qk or q, period_field, counter)
  if v[1] and not lt(v[1], key) then return tonumber(v[2]) or 0 end
  return 0
end

if failed == 0 and max_active > 0 then
  local a = tonumber(redis.call('HGET', P .. 'act', tenant) or '0')
  if a >= max_active then failed = 3 end
end
if failed == 0 and tasks_day > 0 and used('day', day, 'day_tasks') + 1 > tasks_day then failed = 4 end
if failed == 0 and credits_day > 0 and used('day', day, 'day_credits') + credits > credits_day then failed = 5 end
if failed == 0 and credits_month > 0 and used('month', month, 'month_credits') + credits > credits_month then failed = 6 end

-- the key's own limits (contract §15), the same checks on its quota {P}kq:{key id} (its
-- active count in the hash itself), after the tenant's: failed 7-12
local kq, kcaps, klevels, kstamps = nil, {0, 0}, {-1, -1}, {now, now}
if ARGV[19] == '1' then
  kq = P .. 'kq:' .. ARGV[15]
  kcaps = {tonumber(ARGV[20]), tonumber(ARGV[21])}
  for i = 1, 2 do
    if kcaps[i] > 0 then
      klevels[i], kstamps[i] = bucket_level(kq, names[i], kcaps[i], now)
      if failed == 0 and klevels[i] < 1.0 then failed = 6 + i end
    end
  end
  local kmax, kday, kcday, kcmonth = tonumber(ARGV[22]), tonumber(ARGV[23]), tonumber(ARGV[24]), tonumber(ARGV[25])
  if failed == 0 and kmax > 0 and tonumber(redis.call('HGET', kq, 'active') or '0') >= kmax then failed = 9 end
  if failed == 0 and kday > 0 and used('day', day, 'day_tasks', kq) + 1 > kday then failed = 10 end
  if failed == 0 and kcday > 0 and used('day', day, 'day_credits', kq) + credits > kcday then failed = 11 end
  if failed == 0 and kcmonth > 0 and used('month', month, 'month_credits', kq) + credits > kcmonth then failed = 12 end
end

if failed ~= 0 then
  return {0, failed, fmt(levels[1]), fmt(levels[2]), fmt(klevels[1]), fmt(klevels[2])}
end

for i = 1, 2 do
  if caps[i] > 0 then
    levels[i] = levels[i] - 1.0
    bucket_store(q, names[i], levels[i], stamps[i], now)
  end
end
local cday, cmonth = charge(q, day, month, 1, credits)
write_record(rid, ARGV[14])
if cday ~= day or cmonth ~= month then
  redis.call('HSET', tkey(rid), 'charge_day', cday, 'charge_month', cmonth)
end
if kq then
  for i = 1, 2 do
    if kcaps[i] > 0 then
      klevels[i] = klevels[i] - 1.0
      bucket_store(kq, names[i], klevels[i], kstamps[i], now)
    end
  end
  charge(kq, day, month, 1, credits)
  redis.call('HINCRBY', kq, 'active', 1)
  redis.call('HSET', tkey(rid), 'key_limited', '1')
end
index_record(rid)
redis.call('ZADD', P .. 'subz', now, rid)  -- in flight: expire_tasks finds it if its gateway dies
book_charge(cday, tenant, ARGV[15], credits, 1, ARGV[16], redis.call('HGET', tkey(rid), 'relay'))
-- the held Idempotency-Key names this reservation, and outlives its lease if the holder
-- vanishes (idem_begin binds it then; store.base.Store.admit_create)
local idem = ARGV[17]
if idem ~= '' and redis.call('HGET', idem, 'state') == 'pending' then
  redis.call('HSET', idem, 'rid', rid)
  local lease_end = tonumber(redis.call('HGET', idem, 'exp'))
  redis.call('PEXPIRE', idem, math.max(1, math.ceil((lease_end - now + tonumber(ARGV[18])) * 1000)))
end
return {1, 0, fmt(levels[1]), fmt(levels[2]), cday, cmonth, fmt(klevels[1]), fmt(klevels[2])}
