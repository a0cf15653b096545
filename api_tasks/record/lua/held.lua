-- KEYS: job. Returns 1 while an attempt holds the job (its lease has not lapsed), else 0.
local f = redis.call('HMGET', KEYS[1], 'token', 'lease_until')
return lease_holder(f[1], f[2]) and 1 or 0
