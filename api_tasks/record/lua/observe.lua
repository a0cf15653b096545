-- KEYS: per scope, its pacing hash. ARGV: per scope, its request interval ms, token
-- interval ms and burst ms, the requests and tokens the upstream says are left, and the
-- intervals of the limits it says it has ('' for what it did not say, 0 for a limit not
-- below the configured one). A limit lower than the configured one paces the scope from now
-- on (``paced``), until it says otherwise; and an upstream that has less left
-- than the scope's pacing would spend at once (another application uses the same key, or the
-- estimates drifted) holds every worker's next calls back until that much has come back.
local now = now_ms()
for i = 1, #KEYS do
  local a = 7 * (i - 1)
  local burst = tonumber(ARGV[a + 3])
  for k, field in ipairs({'req', 'tok'}) do
    local told = tonumber(ARGV[a + 5 + k])
    if told and tonumber(ARGV[a + k]) > 0 then
      redis.call('HSET', KEYS[i], field .. '_iv', tostring(told))
      redis.call('PEXPIRE', KEYS[i], 3600000)
    end
    local interval, left = paced(KEYS[i], field, tonumber(ARGV[a + k])), tonumber(ARGV[a + 3 + k])
    if interval > 0 and left then
      local floor = now + burst - left * interval
      local tat = tonumber(redis.call('HGET', KEYS[i], field) or '0')
      if floor > tat then
        redis.call('HSET', KEYS[i], field, tostring(floor))
        redis.call('PEXPIRE', KEYS[i], 3600000)
      end
    end
  end
end
return 1
