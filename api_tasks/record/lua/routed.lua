-- KEYS: a deployment's breaker hash, its recent failures, its calls set, its latency hash.
-- ARGV: job id, attempt (n-th call of the job), health ('ok', 'failed' or '' for neither),
-- failures that open the breaker, window ms, cool-down ms, the call's time to first byte ms
-- ('' if it got no answer), latency decay ms, '1' if it was the breaker's probe. The call ended: its slot is freed, its time to
-- first byte joins the deployment's average (a slower one replaces it: the peak); a failure is
-- counted (enough of them within the window open the breaker for the cool-down; a failed
-- probe opens it again), and an answer from a half-open deployment closes it. Returns 1 when
-- this call opened the breaker, else 0.
local now = now_ms()
redis.call('ZREM', KEYS[3], ARGV[1])
if ARGV[7] ~= '' then
  local sample, seen = tonumber(ARGV[7]), redis.call('HMGET', KEYS[4], 'ewma', 'at')
  local w = math.exp(-(now - tonumber(seen[2] or now)) / tonumber(ARGV[8]))
  local ewma = tonumber(seen[1] or '0')
  if sample < ewma then ewma = ewma * w + sample * (1 - w) else ewma = sample end
  redis.call('HSET', KEYS[4], 'ewma', tostring(ewma), 'at', now)
  redis.call('PEXPIRE', KEYS[4], 3600000)
end
local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until') or '0')
local cool = tonumber(ARGV[6])
local function open()
  redis.call('HSET', KEYS[1], 'open_until', now + cool, 'opened_at', now)
  redis.call('HDEL', KEYS[1], 'probe_until')
  redis.call('PEXPIRE', KEYS[1], 4 * cool + tonumber(ARGV[5]))
  redis.call('DEL', KEYS[2])
  return 1
end
if ARGV[3] == 'ok' then
  if open_until > 0 and open_until <= now then redis.call('DEL', KEYS[1], KEYS[2]) end
  return 0
end
if ARGV[3] ~= 'failed' then
  -- a probe that never went out (parked, cancelled): the next call probes instead
  if ARGV[9] == '1' then redis.call('HDEL', KEYS[1], 'probe_until') end
  return 0
end
if open_until > 0 then
  if open_until <= now then return open() end  -- the probe failed
  return 0  -- already open
end
redis.call('ZADD', KEYS[2], now, ARGV[1] .. ':' .. ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[5]))
redis.call('PEXPIRE', KEYS[2], ARGV[5])
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then return open() end
return 0
