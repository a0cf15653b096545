-- KEYS: batch, jobs, input, output, errors, active batches. ARGV: batch id, now, ttl.
-- Returns 1 when the batch ended, 2 when it goes on to be finalized, else 0.
local s = redis.call('HGET', KEYS[1], 'status')
if s ~= 'in_progress' and s ~= 'cancelling' then
  redis.call('SREM', KEYS[6], ARGV[1])
  return 0
end
if redis.call('HLEN', KEYS[2]) > 0 then return 0 end
local counts = redis.call('HMGET', KEYS[1], 'sent', 'total')
if tonumber(counts[1] or '0') < tonumber(counts[2] or '0') then return 0 end
local ending = 'completed'
if s == 'cancelling' then
  ending = redis.call('HEXISTS', KEYS[1], 'expiring') == 1 and 'expired' or 'cancelled'
end
redis.call('DEL', KEYS[3])
for i = 1, 5 do redis.call('EXPIRE', KEYS[i], ARGV[3]) end
if redis.call('HEXISTS', KEYS[1], 'owner') == 1 then
  -- made through the Batches API: it stays active until its files are made (batch_finalize)
  redis.call('HSET', KEYS[1], 'status', 'finalizing', 'ending', ending, 'finalizing_at',
             ARGV[2])
  return 2
end
redis.call('HSET', KEYS[1], 'status', ending, 'finished_at', ARGV[2])
redis.call('SREM', KEYS[6], ARGV[1])
return 1
