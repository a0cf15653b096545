-- KEYS: job, lease, running index. ARGV: token, lease_ms, job id. Also re-takes a lease
-- that lapsed while Redis was away, as long as the record still names this attempt.
-- Returns when the lease now lapses (ms; the slots its call holds in flight are renewed to
-- it), 0 (this attempt itself ended, parked or released the job a moment ago: ``ended_by``
-- names it) or -1 (lost: another attempt took it, or the record is gone).
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then
  if redis.call('HGET', KEYS[1], 'ended_by') == ARGV[1] then return 0 end
  return -1
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
local until_ms = now_ms() + tonumber(ARGV[2])
redis.call('ZADD', KEYS[3], 'XX', until_ms, ARGV[3])
return until_ms
