-- KEYS: job, running index. ARGV: token, lease_ms, job id. Also re-takes a lease that lapsed
-- while Redis was away, as long as the record still names this attempt.
-- Returns when the lease now lapses (ms; the slots its call holds in flight are renewed to
-- it), 0 (this attempt itself ended, parked or released the job a moment ago: ``ended_by``
-- names it) or -1 (lost: another attempt took it, or the record is gone).
local f = redis.call('HMGET', KEYS[1], 'token', 'ended_by')
if f[1] ~= ARGV[1] then
  if f[2] == ARGV[1] then return 0 end
  return -1
end
local until_ms = now_ms() + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'lease_until', until_ms)
redis.call('ZADD', KEYS[2], 'XX', until_ms, ARGV[3])
return until_ms
