-- KEYS: job, running index, running messages. ARGV: token, job id. The worker stops: the job goes back to its
-- queue.
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'status', 'queued', 'ended_by', ARGV[1])
redis.call('HDEL', KEYS[1], unpack(HELD))
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('HDEL', KEYS[3], ARGV[2])
return 1
