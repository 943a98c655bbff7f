-- include: lib.lua
-- KEYS: key:{id}. ARGV: see rotate_secret in lib.lua. A revoked key is refused: its fields
-- as they are, nothing written.
local key = KEYS[1]
if redis.call('HEXISTS', key, 'revoked_at') == 1 then
  return cjson.encode(redis.call('HGETALL', key))
end
return rotate_secret(key, 'secret_hash', 'previous_hash', 'previous_expires_at', 'earlier_hashes')
