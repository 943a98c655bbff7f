-- ARGV: P, then key id, used-at pairs. Raises last_used_at, never lowers it; unknown keys
-- are skipped (nothing created), except config keys (ids key_cfg_...), which have no
-- record: their times are kept in the hash `cfgused`, the same way. The directory version
-- is not bumped.
local P = ARGV[1]
for i = 2, #ARGV, 2 do
  local id, at = ARGV[i], ARGV[i + 1]
  if string.sub(id, 1, 8) == 'key_cfg_' then
    local cur = redis.call('HGET', P .. 'cfgused', id)
    if (not cur) or tonumber(cur) < tonumber(at) then
      redis.call('HSET', P .. 'cfgused', id, at)
    end
  else
    local k = P .. 'key:' .. id
    if redis.call('EXISTS', k) == 1 then
      local cur = redis.call('HGET', k, 'last_used_at')
      if (not cur) or tonumber(cur) < tonumber(at) then
        redis.call('HSET', k, 'last_used_at', at)
      end
    end
  end
end
return 0
