-- KEYS: delayed set, delayed messages, the scheduler's wake list. ARGV: job id, the score
-- ``_DUE`` held it at, retry ms ('' when it was sent), the wake list's ttl. Drops the entry and message unless the job was parked or
-- deferred again meanwhile (its score moved); a failed send is due again after ``retry``.
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) ~= tonumber(ARGV[2]) then return 0 end
if ARGV[3] ~= '' then
  redis.call('ZADD', KEYS[1], now_ms() + tonumber(ARGV[3]), ARGV[1])
  leave_wake(KEYS[3], ARGV[4])  -- whoever sweeps next knows of it
  return 0
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
