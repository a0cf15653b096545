-- KEYS: job, result, events, cancel. Deletes an ended job's keys, so its id can run anew.
local s = redis.call('HGET', KEYS[1], 'status')
if not ended(s) then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
return 1
