-- KEYS: running index, job, lease, delayed set, delayed messages, running messages (its
-- caller then wakes the scheduler, which sends the job now). ARGV: job id, ttl. A job whose lease lapsed a while ago (the unacked sweep had its chance
-- first): if it is still running it lost its worker and its message, so it counts a crash
-- and is sent again from the message its claim kept. Returns 'alive', 'gone' or
-- 'recovered'.
local now = now_ms()
local left = redis.call('PTTL', KEYS[3])
if left > 0 then
  redis.call('ZADD', KEYS[1], 'XX', now + left, ARGV[1])
  return 'alive'
end
redis.call('ZREM', KEYS[1], ARGV[1])
local message = redis.call('HGET', KEYS[6], ARGV[1])
redis.call('HDEL', KEYS[6], ARGV[1])
if redis.call('HGET', KEYS[2], 'status') ~= 'running' or not message then return 'gone' end
redis.call('HSET', KEYS[2], 'status', 'queued')
redis.call('HINCRBY', KEYS[2], 'crashes', 1)
redis.call('HDEL', KEYS[2], 'token')
redis.call('ZADD', KEYS[4], 'NX', now, ARGV[1])
redis.call('HSETNX', KEYS[5], ARGV[1], message)
redis.call('EXPIRE', KEYS[4], ARGV[2])
redis.call('EXPIRE', KEYS[5], ARGV[2])
return 'recovered'
