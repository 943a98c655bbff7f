-- include: lib.lua
-- KEYS: key:{id}. ARGV: see update_record in lib.lua
return update_record(KEYS[1])
