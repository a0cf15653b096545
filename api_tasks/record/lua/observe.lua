-- KEYS: per scope, its pacing hash. ARGV: the model the answer was for, then per scope its
-- request interval ms, token interval ms and burst ms, the requests and tokens the upstream
-- says are left, the intervals of the limits it says it has, and the ms until each is whole
-- again ('' for what it did not say; an interval of 0 for a limit not below the configured
-- one). A limit lower than the configured one paces the scope from now on (``paced``), until
-- it says otherwise. What the upstream holds when idle is the most it was seen to have left
-- for that model; when it has less than that, beyond what the scope spent itself (another
-- application uses the same key, or the estimates drifted), every worker's next calls wait
-- as long as the scope's pace takes to make the difference up (never past when the upstream
-- says it is whole again), so its reserve is never drawn down by more than a scope's burst.
local now = now_ms()
local model = ARGV[1]
for i = 1, #KEYS do
  local a = 1 + 9 * (i - 1)
  local burst = tonumber(ARGV[a + 3])
  for k, field in ipairs({'req', 'tok'}) do
    local told = tonumber(ARGV[a + 5 + k])
    if told and tonumber(ARGV[a + k]) > 0 then
      redis.call('HSET', KEYS[i], field .. '_iv', tostring(told))
      redis.call('PEXPIRE', KEYS[i], 3600000)
    end
    local interval, left = paced(KEYS[i], field, tonumber(ARGV[a + k])), tonumber(ARGV[a + 3 + k])
    if interval > 0 and left then
      local name = field .. '_cap:' .. model
      local cap = math.max(tonumber(redis.call('HGET', KEYS[i], name) or '0'), left)
      redis.call('HSET', KEYS[i], name, tostring(cap))
      local floor = math.max(now + burst - left * interval, now + (cap - left) * interval)
      local whole = tonumber(ARGV[a + 7 + k])
      if whole then floor = math.min(floor, now + whole) end
      local tat = tonumber(redis.call('HGET', KEYS[i], field) or '0')
      if floor > tat then
        redis.call('HSET', KEYS[i], field, tostring(floor))
        redis.call('PEXPIRE', KEYS[i], 3600000)
      end
    end
  end
end
return 1
