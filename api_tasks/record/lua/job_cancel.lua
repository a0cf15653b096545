-- KEYS: job, cancel, result, events, channel. ARGV: now, ttl, envelope, event, field,
-- '1' to leave a running job alone. A queued job ends here and now; its final event
-- follows whatever the stream holds (a job requeued by a stopping worker may have
-- chunks of an earlier attempt).
local s = redis.call('HGET', KEYS[1], 'status')
local created = redis.call('HGET', KEYS[1], 'created_at') or ARGV[1]
if s == 'succeeded' or s == 'failed' or s == 'cancelled' then return {s, '0', created} end

if not s then return {'missing'} end
if ARGV[6] == '1' and s ~= 'queued' and s ~= 'waiting' then return {'running'} end
redis.call('SET', KEYS[2], '1', 'EX', ARGV[2])
if s ~= 'queued' and s ~= 'waiting' then return {'cancelling'} end
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('SET', KEYS[3], ARGV[3], 'EX', ARGV[2])
local id = '0-1'
local last = redis.call('XREVRANGE', KEYS[4], '+', '-', 'COUNT', 1)[1]
if last then
  local attempt, seq = string.match(last[1], '(%d+)-(%d+)')
  id = attempt .. '-' .. (tonumber(seq) + 1)
end
redis.call('XADD', KEYS[4], id, ARGV[5], ARGV[4])
redis.call('EXPIRE', KEYS[4], ARGV[2])
redis.call('PUBLISH', KEYS[5], ARGV[4])
return {'cancelled'}
