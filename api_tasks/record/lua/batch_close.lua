-- KEYS: batch, jobs, input, output, errors, active batches. ARGV: batch id, now, ttl.
local s = redis.call('HGET', KEYS[1], 'status')
if s ~= 'in_progress' and s ~= 'cancelling' then
  redis.call('SREM', KEYS[6], ARGV[1])
  return 0
end
if redis.call('HLEN', KEYS[2]) > 0 then return 0 end
local counts = redis.call('HMGET', KEYS[1], 'sent', 'total')
if tonumber(counts[1] or '0') < tonumber(counts[2] or '0') then return 0 end
redis.call('HSET', KEYS[1], 'status', s == 'in_progress' and 'completed' or 'cancelled',
           'finished_at', ARGV[2])
redis.call('DEL', KEYS[3])
redis.call('SREM', KEYS[6], ARGV[1])
for i = 1, 5 do redis.call('EXPIRE', KEYS[i], ARGV[3]) end
return 1
