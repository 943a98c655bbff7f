-- ARGV: P, then key id, used-at pairs. Raises last_used_at, never lowers it; unknown keys
-- are skipped (nothing created); the directory version is not bumped.
local P = ARGV[1]
for i = 2, #ARGV, 2 do
  local k = P .. 'key:' .. ARGV[i]
  if redis.call('EXISTS', k) == 1 then
    local cur = redis.call('HGET', k, 'last_used_at')
    if (not cur) or tonumber(cur) < tonumber(ARGV[i + 1]) then
      redis.call('HSET', k, 'last_used_at', ARGV[i + 1])
    end
  end
end
return 0
