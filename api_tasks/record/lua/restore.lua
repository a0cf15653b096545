-- KEYS: unacked index, unacked hash, job, lease, queue, running index, running messages.
-- ARGV: delivery tag, message, job id.
-- Gives a dead worker's unacked message back to its queue, unless a live lease
-- says its job is still running; a message of a finished job is just dropped.
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then return 'gone' end
if redis.call('EXISTS', KEYS[4]) == 1 then return 'alive' end
local s = redis.call('HGET', KEYS[3], 'status')
local done = ended(s)
if not done then
  if s == 'running' then
    redis.call('HINCRBY', KEYS[3], 'crashes', 1)
    redis.call('HSET', KEYS[3], 'status', 'queued')
    redis.call('HDEL', KEYS[3], 'token')
  end
  redis.call('ZREM', KEYS[6], ARGV[3])
  redis.call('HDEL', KEYS[7], ARGV[3])
  redis.call('RPUSH', KEYS[5], ARGV[2])
end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
if done then return 'ended' end
return 'restored'
