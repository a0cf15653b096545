-- KEYS: job, delayed set, delayed messages (its caller then wakes the scheduler).
-- ARGV: job id, message, margin ms, ttl.
-- A delivery that found the job held by another attempt: the job is looked at again when
-- that lease would lapse, so a holder that gave its message back without its lease (a
-- failed give-back) cannot leave the job with no message. Returns 1, or 0 if the lease is
-- already gone (claim again).
local f = redis.call('HMGET', KEYS[1], 'token', 'lease_until')
if not lease_holder(f[1], f[2]) then return 0 end
local due = tonumber(f[2]) + tonumber(ARGV[3])
redis.call('ZADD', KEYS[2], 'NX', due, ARGV[1])
redis.call('HSETNX', KEYS[3], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('EXPIRE', KEYS[3], ARGV[4])
return 1
