-- KEYS: pending webhook deliveries. ARGV: now (ms), lease (ms), this sender's token, the
-- prefix of a delivery's hash. {the delivery due first, ''}, put off by the lease while it
-- is sent (a sender that dies leaves it due again then); its hash names this sender, so a
-- sender whose lease ran out cannot record an attempt over another's. With none due:
-- {'', in how many ms the next is due ('' when none is pending)}.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1)[1]
if not due then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {'', first[2] and tostring(tonumber(first[2]) - tonumber(ARGV[1])) or ''}
end
redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), due)
redis.call('HSET', ARGV[4] .. due, 'sender', ARGV[3])
return {due, ''}
