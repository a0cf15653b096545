-- KEYS: batch, input, its shard's set of active batches. ARGV: batch id, total, ttl, result
-- ttl. Hands the batch to the workers (its caller then wakes the pump), unless it was
-- cancelled (or expired) while uploading.
local s = redis.call('HGET', KEYS[1], 'status')
if s ~= 'uploading' then
  redis.call('DEL', KEYS[2])
  if s then redis.call('EXPIRE', KEYS[1], ARGV[4]) end
  return s or 'missing'
end
redis.call('HSET', KEYS[1], 'status', 'in_progress', 'total', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('EXPIRE', KEYS[3], ARGV[3])
return 'in_progress'
