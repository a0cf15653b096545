-- KEYS: job, kombu's unacked index, kombu's unacked hash (one Redis holds the broker's keys
-- and the state's). ARGV: the finishing attempt's token, its delivery's tag. Sent right after
-- a finish in the same round trip: takes the delivery's unacked entry out, as kombu's ack
-- would after the task returns, once the finish ran (the job ended, or another attempt holds
-- it); never if it did not (out of memory, a script error: this attempt still holds the job),
-- so that a requeue still finds the message. Returns 1 if taken out, else 0.
local f = redis.call('HMGET', KEYS[1], 'status', 'token')
if not ended(f[1]) and f[2] == ARGV[1] then return 0 end
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('HDEL', KEYS[3], ARGV[2])
return 1
