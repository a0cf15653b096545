-- KEYS: job, delayed set, delayed messages, running index, running messages, cancel (its
-- caller then wakes the scheduler).
-- ARGV: token, job id, wait ms, reason,
-- message, ttl, turn ms from now ('' = none reserved), lead ms, the deployment and model the
-- turn is under (JSON; '' when not known). The job leaves its worker
-- to wait for a limit and is sent again ``lead`` before its turn (or when due). Returns 1
-- when parked, 0 when another attempt holds it, 2 when it was cancelled meanwhile (its
-- worker ends it now rather than park a job nobody wants).
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
if redis.call('EXISTS', KEYS[6]) == 1 then return 2 end
local now = now_ms()
local due = now + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'status', 'waiting', 'waiting_until', tostring(due / 1000),
           'waiting_for', ARGV[4])
if ARGV[7] ~= '' then
  redis.call('HSET', KEYS[1], 'turn_at', tostring(now + tonumber(ARGV[7])))
  if ARGV[9] ~= '' then redis.call('HSET', KEYS[1], 'turn_on', ARGV[9]) end
  due = math.max(now + tonumber(ARGV[7]) - tonumber(ARGV[8]), now)
else
  redis.call('HDEL', KEYS[1], 'turn_at', 'turn_on')
end
redis.call('HSET', KEYS[1], 'ended_by', ARGV[1])
redis.call('HDEL', KEYS[1], unpack(HELD))
redis.call('ZREM', KEYS[4], ARGV[2])
redis.call('HDEL', KEYS[5], ARGV[2])
redis.call('ZADD', KEYS[2], due, ARGV[2])
redis.call('HSET', KEYS[3], ARGV[2], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[6])
redis.call('EXPIRE', KEYS[3], ARGV[6])
return 1
