-- KEYS: per scope, its pacing hash. ARGV: the model the answer was for, then per scope its
-- request interval ms, token interval ms and burst ms, the requests and tokens the upstream
-- says are left, the intervals of the limits it says it has, the ms until each is whole
-- again ('' for what it did not say; an interval of 0 for a limit not below the configured
-- one), its utilization, and the requests and tokens the call counted against it (0 when
-- it was refused: the scope's own spending, as it reaches the upstream). A limit lower than the configured one paces the scope from now
-- on (``paced``), until it says otherwise. What the upstream holds when idle is the most it
-- was seen to have left for that model; when it has less than that, beyond what the scope
-- spent itself (another application uses the same key, or the estimates drifted), every
-- worker's next calls wait as long as the scope's pace takes to make the difference up
-- (never past when the upstream says it is whole again), so its reserve is never drawn down
-- by more than a scope's burst. And from what it has left at answers at least SAMPLE_MS
-- apart, less what the scope spent between them, it estimates the others' rate (while the
-- upstream is not full: a full one drops its refill); the scope then paces to utilization of
-- what they leave, less MARGIN of the limit for the estimate's error.
local SAMPLE_MS, TAU_MS, MARGIN, NOTICED = 2000, 10000, 0.01, 0.02
local now = now_ms()
local model = ARGV[1]

local function others(pace, field, left, cap, configured, utilization)
  local at, was, spent_then = unpack(redis.call('HMGET', pace, field .. '_s_at:' .. model,
    field .. '_s_left:' .. model, field .. '_s_spent:' .. model))
  local spent = tonumber(redis.call('HGET', pace, field .. '_spent') or '0')
  if at and now - tonumber(at) < SAMPLE_MS then return end
  if at and tonumber(was) < cap * 0.98 and left < cap * 0.98 then
    local d = now - tonumber(at)
    -- the limit's own rate per ms (the configured or learnt one, not the others-slowed)
    local rate = 1 / (math.max(configured, tonumber(redis.call('HGET', pace, field .. '_iv')
      or '0')) * utilization)
    local sample = (rate * d - (left - tonumber(was)) - (spent - tonumber(spent_then))) / d
    local before, w = tonumber(redis.call('HGET', pace, field .. '_others')), math.exp(-d / TAU_MS)
    local estimate = math.max(before and before * w + sample * (1 - w) or sample, 0)
    redis.call('HSET', pace, field .. '_others', tostring(estimate), field .. '_oat', now)
    local room = math.max(utilization * (rate - estimate) - MARGIN * rate, 0.05 * rate)
    if estimate > NOTICED * rate then
      redis.call('HSET', pace, field .. '_oiv', tostring(1 / room))
    else
      redis.call('HDEL', pace, field .. '_oiv')
    end
  end
  redis.call('HSET', pace, field .. '_s_at:' .. model, now, field .. '_s_left:' .. model, left,
             field .. '_s_spent:' .. model, tostring(spent))
end

for i = 1, #KEYS do
  local a = 1 + 12 * (i - 1)
  local burst = tonumber(ARGV[a + 3])
  for k, field in ipairs({'req', 'tok'}) do
    local charged = tonumber(ARGV[a + 10 + k])
    if charged > 0 and tonumber(ARGV[a + k]) > 0 then
      redis.call('HINCRBYFLOAT', KEYS[i], field .. '_spent', charged)
    end
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
      end
      others(KEYS[i], field, left, cap, tonumber(ARGV[a + k]), tonumber(ARGV[a + 10]))
      redis.call('PEXPIRE', KEYS[i], 3600000)
    end
  end
end
return 1
