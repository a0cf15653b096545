-- KEYS: a key. ARGV: seconds. Makes the key live at least that long from now, if it exists
-- and expires sooner (``EXPIRE GT`` before Redis 7).
local left = redis.call('TTL', KEYS[1])
if left >= 0 and left < tonumber(ARGV[1]) then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return 1
