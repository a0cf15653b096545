-- KEYS: per scope, its pacing hash then its in-flight set. ARGV: job id, then per scope
-- the token interval ms and the tokens to give back (negative when the call used more than
-- it reserved: charged). Frees the call's slot, gives back, charges what it overran.
local now = now_ms()

for i = 1, #KEYS / 2 do
  local pace = KEYS[2 * i - 1]
  local interval, unused = paced(pace, 'tok', tonumber(ARGV[2 * i])), tonumber(ARGV[2 * i + 1])
  redis.call('ZREM', KEYS[2 * i], ARGV[1])
  local tat = tonumber(redis.call('HGET', pace, 'tok') or '0')
  if interval > 0 and unused > 0 and tat > now then
    redis.call('HSET', pace, 'tok', tostring(math.max(tat - unused * interval, now)))
  elseif interval > 0 and unused < 0 then
    redis.call('HSET', pace, 'tok', tostring(math.max(tat, now) - unused * interval))
  end
end
return 1
