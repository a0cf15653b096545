-- KEYS: per scope, its pacing hash then its in-flight set. ARGV: job id, cost, then per
-- scope its request and token intervals ms (as ``admit`` took them). Undoes a turn
-- ``admit`` just reserved that the call will not take (a scope in another slot said wait):
-- frees its slot and moves each bucket back by what the turn charged (never behind now).
local now = now_ms()
local id, cost = ARGV[1], tonumber(ARGV[2])

for i = 1, #KEYS / 2 do
  local pace = KEYS[2 * i - 1]
  redis.call('ZREM', KEYS[2 * i], id)
  for k, field in ipairs({'req', 'tok'}) do
    local interval = paced(pace, field, tonumber(ARGV[2 + 2 * (i - 1) + k]))
    local tat = tonumber(redis.call('HGET', pace, field) or '0')
    local unit = field == 'req' and 1 or cost
    if interval > 0 and tat > now then
      redis.call('HSET', pace, field, tostring(math.max(tat - unit * interval, now)))
      redis.call('HINCRBYFLOAT', pace, 'used_' .. field, -unit)
    end
  end
end
return 1
