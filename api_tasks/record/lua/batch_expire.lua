-- KEYS: batch. ARGV: now. A running batch past its expires_at stops as a cancel does, and
-- ends expired: what finished is kept, the rest goes to the error file as batch_expired.
if redis.call('HGET', KEYS[1], 'status') ~= 'in_progress' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'cancelling', 'expiring', ARGV[1])
return 1
