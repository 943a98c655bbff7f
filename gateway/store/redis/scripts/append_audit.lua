-- include: lib.lua
-- ARGV: P, audit (5): an entry not tied to a directory change (no version bump)
append_audit(2)
return 1
