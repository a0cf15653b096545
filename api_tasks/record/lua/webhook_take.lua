-- KEYS: pending webhook deliveries. ARGV: now (ms), lease (ms), this sender's token, the
-- prefix of a delivery's hash. The delivery due first, if any, put off by the lease while it
-- is sent (a sender that dies leaves it due again then); its hash names this sender, so a
-- sender whose lease ran out cannot record an attempt over another's.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1)[1]
if not due then return false end
redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), due)
redis.call('HSET', ARGV[4] .. due, 'sender', ARGV[3])
return due
