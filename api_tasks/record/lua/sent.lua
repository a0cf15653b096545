-- KEYS: delayed set, delayed messages. ARGV: job id, the score ``_DUE`` held it at, retry
-- ms ('' when it was sent). Drops the entry and message unless the job was parked or
-- deferred again meanwhile (its score moved); a failed send is due again after ``retry``
-- (2: its caller wakes the scheduler).
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) ~= tonumber(ARGV[2]) then return 0 end
if ARGV[3] ~= '' then
  redis.call('ZADD', KEYS[1], now_ms() + tonumber(ARGV[3]), ARGV[1])
  return 2
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
