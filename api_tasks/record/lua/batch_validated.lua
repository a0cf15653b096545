-- KEYS: batch, staged input, input, the set of active batches. ARGV: total, ttl, now, model.
-- A validating batch whose checked lines are staged: they become its input and it starts,
-- unless it was cancelled (or another validation started it) meanwhile.
local s = redis.call('HGET', KEYS[1], 'status')
if s ~= 'validating' then
  redis.call('DEL', KEYS[2])
  return s or 'missing'
end
redis.call('RENAME', KEYS[2], KEYS[3])
redis.call('HSET', KEYS[1], 'status', 'in_progress', 'total', ARGV[1], 'in_progress_at',
           ARGV[3], 'model', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[3], ARGV[2])
return 'in_progress'
