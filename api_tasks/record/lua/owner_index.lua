-- KEYS: an owner's index of jobs. ARGV: job id, how long any job record lives (s).
-- Adds the job by submit time in microseconds (in milliseconds, jobs submitted in the same
-- one would list in id order, not submit order); entries older than any record can be are
-- dropped, so the index stays as small as the owner's live jobs.
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]) * 1000000)
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
