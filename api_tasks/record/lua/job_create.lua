-- KEYS: job, then (to send its task message in the same step) the lane's list of task
-- messages. ARGV: ttl, the message ('' = none), then field/value pairs. Returns 1 if it
-- created the record, 0 if the id already had one (the message goes anyway: a job sent
-- again under its id is a duplicate the workers drop). The message goes first, so a lane that
-- refuses it leaves nothing written; one script, so no worker sees one without the other.
if KEYS[2] then redis.call('LPUSH', KEYS[2], ARGV[2]) end
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
