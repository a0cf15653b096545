-- KEYS: per deployment of a model group, its breaker hash, calls set (its load), cool-down,
-- pacing hash, in-flight set (its own limits) and latency hash. ARGV: job id, lease ms, the
-- call's token cost, deployments, latency decay ms, then per deployment: '1' if this job already tried it, its weight, a
-- random draw (Exp(1): weighs ties by weight), request interval ms, token interval ms, burst
-- ms, max in flight (0: none), how long a probe call holds a half-open breaker (ms). Picks the deployment with the most
-- room: the soonest turn under its limits and cool-down, then the least expected wait: calls
-- in flight times its time to first byte (decaying while unmeasured, so a deployment that
-- was slow is tried again later), for its weight; skips open breakers, and lets a half-open one have one probe call at a time.
-- Returns {index (0: none), ms to its turn, or when none: to the soonest breaker probe (-1:
-- the job tried every deployment not open), '1' if the call is the breaker's probe}.
local now = now_ms()
local id, lease, cost, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local decay = tonumber(ARGV[5])
local best, best_late, best_score, best_probe, soonest, tried = 0, 0, 0, false, -1, false
local function key(i, k) return KEYS[6 * (i - 1) + k] end
local function arg(i, k) return ARGV[5 + 8 * (i - 1) + k] end
for i = 1, n do
  if arg(i, 1) ~= '1' then
    local usable, probe = true, false
    local open_until = tonumber(redis.call('HGET', key(i, 1), 'open_until') or '0')
    if open_until > now then
      usable = false
    elseif open_until > 0 then  -- half-open: one probe call at a time
      local probing = tonumber(redis.call('HGET', key(i, 1), 'probe_until') or '0')
      if probing > now then usable, open_until = false, probing else probe = true end
    end
    if not usable then
      if soonest < 0 or open_until - now < soonest then soonest = open_until - now end
    else
      local late = math.max(redis.call('PTTL', key(i, 3)), 0)
      local burst = tonumber(arg(i, 6))
      for k, field in ipairs({'req', 'tok'}) do
        local interval = paced(key(i, 4), field, tonumber(arg(i, 3 + k)))
        if interval > 0 then
          local tat = math.max(tonumber(redis.call('HGET', key(i, 4), field) or '0'), now)
          local unit = interval * (field == 'req' and 1 or cost)
          late = math.max(late, tat + unit - math.max(burst, unit) - now)
        end
      end
      local cap = tonumber(arg(i, 7))
      if cap > 0 and redis.call('ZCOUNT', key(i, 5), now, '+inf') >= cap then
        late = math.max(late, 200)
      end
      late = math.ceil(math.max(late, 0) / 50) * 50  -- turns this close are as good
      local seen = redis.call('HMGET', key(i, 6), 'ewma', 'at')
      local wait = tonumber(seen[1] or '0') * math.exp(-(now - tonumber(seen[2] or now)) / decay)
      local score = (redis.call('ZCOUNT', key(i, 2), now, '+inf') + tonumber(arg(i, 3)))
        * (wait + 1) / tonumber(arg(i, 2))
      if best == 0 or late < best_late or (late == best_late and score < best_score) then
        best, best_late, best_score, best_probe = i, late, score, probe
      end
    end
  else
    tried = true
  end
end
if best == 0 then  -- none left untried: the caller moves on; else it waits for a probe
  return {0, tried and '-1' or tostring(soonest), '0'}
end
redis.call('ZREMRANGEBYSCORE', key(best, 2), '-inf', now)
redis.call('ZADD', key(best, 2), now + lease, id)
redis.call('PEXPIRE', key(best, 2), 3600000)  -- members lapse by score, with the lease
if best_probe then
  redis.call('HSET', key(best, 1), 'probe_until', now + tonumber(arg(best, 8)))
end
return {best, tostring(best_late), best_probe and '1' or '0'}
