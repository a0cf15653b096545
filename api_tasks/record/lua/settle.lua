-- KEYS: per scope, its pacing hash then its in-flight set. ARGV: job id, unused tokens
-- (negative when the call used more than it reserved), then per scope the token interval
-- ms. Frees the call's slot, gives back what it did not use, charges what it overran.
local now = now_ms()

local unused = tonumber(ARGV[2])
for i = 1, #KEYS / 2 do
  local pace, interval = KEYS[2 * i - 1], tonumber(ARGV[2 + i])
  redis.call('ZREM', KEYS[2 * i], ARGV[1])
  local tat = tonumber(redis.call('HGET', pace, 'tok') or '0')
  if interval > 0 and unused > 0 and tat > now then
    redis.call('HSET', pace, 'tok', tostring(math.max(tat - unused * interval, now)))
  elseif interval > 0 and unused < 0 then
    redis.call('HSET', pace, 'tok', tostring(math.max(tat, now) - unused * interval))
  end
end
return 1
