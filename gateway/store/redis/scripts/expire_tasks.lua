-- include: lib.lua
-- ARGV: P, now, cutoff (now - timeout; created at or before it expires), ttl,
--       unknown cutoff (now - unknown_timeout, for UNKNOWN reservations),
--       in-flight cutoff (now - in_flight; '' = none) -> {record...}
-- A timed-out task's hash gets the retention TTL too: one the upstream never answers for
-- would otherwise stay forever (a later update renews the TTL).
local out = {}
local lost = {}  -- rid -> its index in out: marked UNKNOWN here, replaced if it expires too
-- rules.lost_in_flight: still SUBMITTING past the in-flight cutoff -> UNKNOWN (mark_unknown)
if ARGV[6] ~= '' then
  for _, rid in ipairs(redis.call('ZRANGEBYSCORE', P .. 'subz', '-inf', ARGV[6])) do
    redis.call('ZREM', P .. 'subz', rid)  -- every entry leaves once: answered ones are stale
    local r = redis.call('HMGET', tkey(rid), 'status', 'active', 'created_at')
    if r[1] == 'SUBMITTING' and r[2] == '1' then
      redis.call('HSET', tkey(rid), 'status', 'UNKNOWN', 'updated_at', ARGV[2])
      redis.call('ZADD', P .. 'unkz', r[3], rid)
      out[#out + 1] = record_json(rid)
      lost[rid] = #out
    end
  end
end
local function expire(rid, only_status)
  local r = redis.call('HMGET', tkey(rid), 'active', 'status', 'tenant_id', 'key_id', 'key_limited')
  if r[1] ~= '1' or TERMINAL[r[2]] or (only_status and r[2] ~= only_status) then return end
  redis.call('HSET', tkey(rid), 'active', '0', 'timed_out', '1', 'updated_at', ARGV[2])
  decr_floor(P .. 'act', r[3], 1)
  local kq = key_quota_of(r[4], r[5])
  if kq then decr_floor(kq, 'active', 1) end
  redis.call('ZREM', P .. 'actz', rid)
  redis.call('ZREM', P .. 'unkz', rid)
  retain(rid, ARGV[4])
  out[lost[rid] or (#out + 1)] = record_json(rid)
end
for _, z in ipairs({{P .. 'actz', ARGV[3], nil}, {P .. 'unkz', ARGV[5], 'UNKNOWN'}}) do
  for _, rid in ipairs(redis.call('ZRANGEBYSCORE', z[1], '-inf', z[2])) do
    redis.call('ZREM', z[1], rid)  -- entries of finished or settled tasks are stale: pruned here
    expire(rid, z[3])
  end
end
return out
