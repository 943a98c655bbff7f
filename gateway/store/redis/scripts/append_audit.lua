-- include: lib.lua
-- ARGV: P, audit (5): an entry not tied to a directory change (no version bump) -> 1, or
-- 0 (nothing written) when an entry with that id exists: idempotent by id
if redis.call('EXISTS', P .. 'aud:' .. ARGV[2]) == 1 then return 0 end
append_audit(2)
return 1
