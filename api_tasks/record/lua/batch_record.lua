-- KEYS: batch, jobs, input, output, errors, the job's result and events. ARGV: job id,
-- counter, record, ttl, then usage name/count pairs. The line's output holds the job's
-- response now: its result and stream go, so a batch's Redis memory follows its window
-- (the job's record stays, small, for a late duplicate delivery to find it ended).
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HDEL', KEYS[2], ARGV[1]) == 0 then return 0 end
local list = KEYS[5]
if ARGV[2] == 'completed' then list = KEYS[4] end
redis.call('RPUSH', list, ARGV[3])
redis.call('HINCRBY', KEYS[1], ARGV[2], 1)
for i = 5, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], 'usage.' .. ARGV[i], ARGV[i + 1]) end
for i = 1, 5 do redis.call('EXPIRE', KEYS[i], ARGV[4]) end
redis.call('DEL', KEYS[6], KEYS[7])
return 1
