-- include: lib.lua
-- KEYS: the ledger's day hashes ({P}led:{day}) to read
-- ARGV: P, tenant filter, '1' when it applies, key filter, '1' when it applies
-- -> for each key, the flat field/value list of its matching fields (field
--    "tenant<TAB>key[<TAB>relay]<TAB>counter", see `book`). Read only.
local tenant, by_tenant, key, by_key = ARGV[2], ARGV[3] == '1', ARGV[4], ARGV[5] == '1'
local out = {}
for i, k in ipairs(KEYS) do
  local h = redis.call('HGETALL', k)
  local kept = {}
  for j = 1, #h, 2 do
    local t, kid = string.match(h[j], '^([^\t]*)\t([^\t]*)\t')
    if (not by_tenant or t == tenant) and (not by_key or kid == key) then
      kept[#kept + 1] = h[j]
      kept[#kept + 1] = h[j + 1]
    end
  end
  out[i] = kept
end
return out
