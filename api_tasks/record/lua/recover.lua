-- KEYS: running index, job, delayed set, delayed messages, running messages (its caller then
-- wakes the scheduler, which sends the job now). ARGV: job id, ttl, how long a lapsed lease
-- is left to its worker once a sweep has seen it (ms). A job whose lease lapsed a while ago
-- (the unacked sweep had its chance first): if it is still running it lost its worker and
-- its message, so it counts a crash and is sent again from the message its claim kept.
-- Returns 'alive', 'lapsing' (``lapsing``: looked at again later), 'gone' or 'recovered'.
local f = redis.call('HMGET', KEYS[2], 'status', 'token', 'lease_until', 'lapse_seen')
if lease_holder(f[2], f[3]) then
  redis.call('ZADD', KEYS[1], 'XX', f[3], ARGV[1])
  return 'alive'
end
if f[1] == 'running' and lapsing(KEYS[2], f[3], f[4], ARGV[3]) then return 'lapsing' end
redis.call('ZREM', KEYS[1], ARGV[1])
local message = redis.call('HGET', KEYS[5], ARGV[1])
redis.call('HDEL', KEYS[5], ARGV[1])
if f[1] ~= 'running' or not message then return 'gone' end
redis.call('HSET', KEYS[2], 'status', 'queued')
redis.call('HINCRBY', KEYS[2], 'crashes', 1)
redis.call('HDEL', KEYS[2], unpack(HELD))
redis.call('ZADD', KEYS[3], 'NX', now_ms(), ARGV[1])
redis.call('HSETNX', KEYS[4], ARGV[1], message)
redis.call('EXPIRE', KEYS[3], ARGV[2])
redis.call('EXPIRE', KEYS[4], ARGV[2])
return 'recovered'
