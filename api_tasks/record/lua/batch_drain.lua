-- KEYS: batch, errors. ARGV: the sent count read, ttl, the counter ('cancelled', or 'failed'
-- for lines whose input is gone), then error-file records. Records lines never sent, so every
-- line ends in a file: a cancelling batch's, or a running one's whose input file went away.
local s = redis.call('HGET', KEYS[1], 'status')
if s ~= 'cancelling' and s ~= 'in_progress' then return 0 end
if redis.call('HGET', KEYS[1], 'sent') ~= ARGV[1] then return 0 end
local n = #ARGV - 3
for i = 4, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
redis.call('HINCRBY', KEYS[1], 'sent', n)
redis.call('HINCRBY', KEYS[1], ARGV[3], n)
for i = 1, 2 do redis.call('EXPIRE', KEYS[i], ARGV[2]) end
return 1
