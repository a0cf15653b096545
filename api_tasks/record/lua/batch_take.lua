-- KEYS: batch, jobs, input. ARGV: the sent count read, ttl, then job id / custom_id
-- pairs. Takes the lines only if no other stepper took them meanwhile.
if redis.call('HGET', KEYS[1], 'status') ~= 'in_progress' then return 0 end
if redis.call('HGET', KEYS[1], 'sent') ~= ARGV[1] then return 0 end
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], 'u:' .. ARGV[i + 1]) end
redis.call('HINCRBY', KEYS[1], 'sent', (#ARGV - 2) / 2)
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[2]) end
return 1
