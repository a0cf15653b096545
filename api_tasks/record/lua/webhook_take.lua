-- KEYS: a shard's pending webhook deliveries. ARGV: now (ms), lease (ms). {the delivery due
-- first, the score it is held at}, put off by the lease while it is sent (a sender that dies
-- leaves it due again then); a sender whose lease ran out cannot record an attempt over
-- another's (``webhook_done`` checks the score). With none due: {'', in how many ms the next
-- is due ('' when none is pending)}.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1)[1]
if not due then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {'', first[2] and tostring(tonumber(first[2]) - tonumber(ARGV[1])) or ''}
end
local held = tonumber(ARGV[1]) + tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], held, due)
return {due, tostring(held)}
