-- KEYS: batch, errors. ARGV: the sent count read, ttl, then error-file records. In a
-- cancelling batch, records lines never sent as cancelled, so every line ends in a file.
if redis.call('HGET', KEYS[1], 'status') ~= 'cancelling' then return 0 end
if redis.call('HGET', KEYS[1], 'sent') ~= ARGV[1] then return 0 end
local n = #ARGV - 2
for i = 3, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
redis.call('HINCRBY', KEYS[1], 'sent', n)
redis.call('HINCRBY', KEYS[1], 'cancelled', n)
for i = 1, 2 do redis.call('EXPIRE', KEYS[i], ARGV[2]) end
return 1
