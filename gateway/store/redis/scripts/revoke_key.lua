-- include: lib.lua
-- KEYS: key:{id}. ARGV: P, fields to set (JSON pairs: revoked_at), audit (5) -> the key's
-- fields as JSON, or '' when unknown. A key already revoked is returned as it is, nothing
-- written: its first revoked_at and one audit entry, however many revocations race.
local key = KEYS[1]
if redis.call('EXISTS', key) == 0 then return '' end
if redis.call('HEXISTS', key, 'revoked_at') == 1 then
  return cjson.encode(redis.call('HGETALL', key))
end
hset_flat(key, ARGV[2])
directory_changed(3)
return cjson.encode(redis.call('HGETALL', key))
