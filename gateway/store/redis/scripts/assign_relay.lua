-- include: lib.lua
-- ARGV: P, rid, relay, key index, ledger ttl ms -> 1 when the SUBMITTING reservation now
-- names `relay` and the key (rules.book_relay_move: its booking moved to that relay)
local k = KEYS[1]
local r = redis.call('HMGET', k, 'status', 'tenant_id', 'credits', 'charge_day', 'key_id', 'relay')
if r[1] ~= 'SUBMITTING' then return 0 end
local relay, old = ARGV[3], r[6] or ''
if relay ~= old then
  local credits = tonumber(r[3]) or 0
  book_charge(r[4], r[2], r[5] or '', credits, -1, ARGV[5], old)
  book_charge(r[4], r[2], r[5] or '', credits, 1, ARGV[5], relay)
end
redis.call('HSET', k, 'relay', relay, 'key_index', ARGV[4])
return 1
