-- KEYS: batch, jobs, input, output, errors. ARGV: job id, counter, record, ttl, then
-- usage name/count pairs.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HDEL', KEYS[2], ARGV[1]) == 0 then return 0 end
local list = KEYS[5]
if ARGV[2] == 'completed' then list = KEYS[4] end
redis.call('RPUSH', list, ARGV[3])
redis.call('HINCRBY', KEYS[1], ARGV[2], 1)
for i = 5, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], 'usage.' .. ARGV[i], ARGV[i + 1]) end
for i = 1, 5 do redis.call('EXPIRE', KEYS[i], ARGV[4]) end
return 1
