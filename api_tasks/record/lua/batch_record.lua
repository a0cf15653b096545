-- KEYS: batch, jobs, input, output, errors, the job's result, events and record. ARGV: job
-- id, counter, record, ttl, then usage name/count pairs. The line's output holds the job's
-- response now: its result and stream go, and its record keeps only its status (for a late
-- duplicate delivery to find it ended), so a batch's Redis memory follows its window.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HDEL', KEYS[2], ARGV[1]) == 0 then return 0 end
local list = KEYS[5]
if ARGV[2] == 'completed' then list = KEYS[4] end
redis.call('RPUSH', list, ARGV[3])
redis.call('HINCRBY', KEYS[1], ARGV[2], 1)
for i = 5, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], 'usage.' .. ARGV[i], ARGV[i + 1]) end
for i = 1, 5 do redis.call('EXPIRE', KEYS[i], ARGV[4]) end
redis.call('DEL', KEYS[6], KEYS[7])
local status, left = redis.call('HGET', KEYS[8], 'status'), redis.call('PTTL', KEYS[8])
if status and left > 0 then
  redis.call('DEL', KEYS[8])
  redis.call('HSET', KEYS[8], 'status', status)
  redis.call('PEXPIRE', KEYS[8], left)
end
return 1
