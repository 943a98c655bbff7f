-- include: lib.lua
-- KEYS: ten:{id}. ARGV: see update_record in lib.lua (limits merged, updated_at set by the caller's fields)
return update_record(KEYS[1])
