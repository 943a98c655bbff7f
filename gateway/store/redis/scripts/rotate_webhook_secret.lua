-- include: lib.lua
-- KEYS: ten:{id}. ARGV: see rotate_secret in lib.lua (updated_at is in the fields to set).
return rotate_secret(
  KEYS[1], 'webhook_secret', 'previous_webhook_secret', 'previous_webhook_secret_expires_at', 'earlier_webhook_secrets'
)
