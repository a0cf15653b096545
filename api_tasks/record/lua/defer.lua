-- KEYS: job, lease, delayed set, delayed messages (its caller then wakes the scheduler).
-- ARGV: job id, message, margin ms, ttl.
-- A delivery that found the job held by another attempt: the job is looked at again when
-- that lease would lapse, so a holder that gave its message back without its lease (a
-- failed give-back) cannot leave the job with no message. Returns 1, or 0 if the lease is
-- already gone (claim again).
local left = redis.call('PTTL', KEYS[2])
if left < 0 then return 0 end
local due = now_ms() + left + tonumber(ARGV[3])
redis.call('ZADD', KEYS[3], 'NX', due, ARGV[1])
redis.call('HSETNX', KEYS[4], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[3], ARGV[4])
redis.call('EXPIRE', KEYS[4], ARGV[4])
return 1
