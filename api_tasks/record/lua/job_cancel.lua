-- KEYS: job, cancel, result, events, then the webhooks of an end here (``add_webhooks``).
-- ARGV: now, ttl, envelope, event, field, '1' to leave a running job alone, its pub/sub
-- channel, then the webhooks' ARGV. Returns {verdict} (``store.Cancel``). A queued job ends here and now; its final event
-- follows whatever the stream holds (a job requeued by a stopping worker may have
-- chunks of an earlier attempt).
local s = redis.call('HGET', KEYS[1], 'status')
if ended(s) then return {'ended'} end

if not s then return {'missing'} end
if ARGV[6] == '1' and s ~= 'queued' and s ~= 'waiting' then return {'running'} end
redis.call('SET', KEYS[2], '1', 'EX', ARGV[2])
if s ~= 'queued' and s ~= 'waiting' then return {'cancelling'} end
-- no worker ran it, so none counted its end yet: the first to drop its message does
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[1], 'uncounted', '1')
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('SET', KEYS[3], ARGV[3], 'EX', ARGV[2])
add_entry(KEYS[4], '0-1', ARGV[5], ARGV[4])
redis.call('EXPIRE', KEYS[4], ARGV[2])
redis.call('PUBLISH', ARGV[7], ARGV[4])
add_webhooks(5, 8)
return {'cancelled'}
