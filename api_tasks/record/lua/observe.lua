-- KEYS: per scope, its pacing hash. ARGV: per scope, its request interval ms, token
-- interval ms and burst ms, the requests and tokens the upstream says are left, and the
-- intervals of the limits it says it has ('' for what it did not say, 0 for a limit not
-- below the configured one). A limit lower than the configured one paces the scope from now
-- on (``paced``), until it says otherwise; and an upstream that has less left than it holds
-- when idle (another application uses the same key, or the estimates drifted) holds every
-- worker's next calls back until that much has come back at the scope's pace.
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
      -- the most it was seen to hold: what it holds when nobody has spent any lately
      local cap = math.max(tonumber(redis.call('HGET', KEYS[i], field .. '_cap') or '0'), left)
      redis.call('HSET', KEYS[i], field .. '_cap', tostring(cap))
      -- what others spent is missing from it too: the scope waits as long as its own pace
      -- takes to make that up (its own spending is in its pacing already), so the upstream's
      -- reserve is never drawn down by more than one burst of the scope's
      local floor = math.max(now + burst - left * interval, now + (cap - left) * interval)
      local tat = tonumber(redis.call('HGET', KEYS[i], field) or '0')
      if floor > tat then
        redis.call('HSET', KEYS[i], field, tostring(floor))
        redis.call('PEXPIRE', KEYS[i], 3600000)
      end
    end
  end
end
return 1
