-- KEYS: a shard's pending webhook deliveries, the delivery. ARGV: delivery id, now (ms), the
-- answer's status (0: none), the error ('' when delivered), when to try again (ms; '' to
-- stop), the score ``webhook_take`` held it at. Records one attempt: delivered, due again,
-- or given up; nothing if another sender took the delivery over meanwhile (its score moved).
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 0
end
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) ~= tonumber(ARGV[6]) then return 0 end
redis.call('HINCRBY', KEYS[2], 'attempts', 1)
redis.call('HSET', KEYS[2], 'last_at', ARGV[2], 'last_status', ARGV[3], 'last_error', ARGV[4])
if ARGV[4] == '' then
  redis.call('HSET', KEYS[2], 'status', 'delivered', 'delivered_at', ARGV[2])
  redis.call('ZREM', KEYS[1], ARGV[1])
elseif ARGV[5] == '' then
  redis.call('HSET', KEYS[2], 'status', 'failed')
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[2], 'status', 'retrying', 'next_at', ARGV[5])
  redis.call('ZADD', KEYS[1], ARGV[5], ARGV[1])
end
return 1
