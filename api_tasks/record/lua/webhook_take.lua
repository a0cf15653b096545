-- KEYS: pending webhook deliveries. ARGV: now (ms), lease (ms), how many. The deliveries due,
-- each put off by the lease while it is sent (a sender that dies leaves it due again then).
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(due) do
  redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), id)
end
return due
