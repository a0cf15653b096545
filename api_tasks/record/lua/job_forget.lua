-- KEYS: job. Deletes a queued record no worker has claimed yet.
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return 0 end
if redis.call('HEXISTS', KEYS[1], 'deliveries') == 1 then return 0 end
return redis.call('DEL', KEYS[1])
