-- KEYS: per scope, its pacing hash then its in-flight set. ARGV: job id, then per scope
-- the token interval ms, the tokens to give back (negative when the call used more than
-- it reserved: charged) and the difference between what the upstream counted of the call
-- and what ``observe`` took it for (its reservation). Frees the call's slot, gives back,
-- charges what it overran, and corrects what the scope is known to have spent.
local now = now_ms()

for i = 1, #KEYS / 2 do
  local pace = KEYS[2 * i - 1]
  local interval, unused = paced(pace, 'tok', tonumber(ARGV[3 * i - 1])), tonumber(ARGV[3 * i])
  local counted = tonumber(ARGV[3 * i + 1])
  redis.call('ZREM', KEYS[2 * i], ARGV[1])
  local tat = tonumber(redis.call('HGET', pace, 'tok') or '0')
  if interval > 0 and unused > 0 and tat > now then
    redis.call('HSET', pace, 'tok', tostring(math.max(tat - unused * interval, now)))
  elseif interval > 0 and unused < 0 then
    redis.call('HSET', pace, 'tok', tostring(math.max(tat, now) - unused * interval))
  end
  if interval > 0 and counted ~= 0 and redis.call('HEXISTS', pace, 'tok_spent') == 1 then
    redis.call('HINCRBYFLOAT', pace, 'tok_spent', counted)
  end
end
return 1
