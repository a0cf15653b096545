-- KEYS: per scope, its pacing hash, in-flight set, line, line expiries and line costs.
-- ARGV: job id, cost, reserve_ms, horizon_ms, lease_ms, already reserved ('1': only take
-- a slot in flight), scopes, place in line (ms; '' = not in line), line grace ms, then
-- per scope: request interval ms, token interval ms (each slowed to the upstream's own limit
-- when it said that is lower: ``paced``), request burst ms, token burst ms, max in flight
-- (0 = no such limit). Returns {verdict, wait ms, reason}: 'turn' means
-- the turn is reserved, that long from now (a slot in flight is taken only if it is
-- within reserve_ms); 'wait' means nothing was reserved (full in flight, too far, or
-- older jobs in line first).
local now = now_ms()

local id, cost, reserve = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local reserved, scopes, place = ARGV[6] == '1', tonumber(ARGV[7]), tonumber(ARGV[8])
local wait, reason, lates, aheads, behind = 0, '', {}, {}, false
local function key(i, n) return KEYS[5 * (i - 1) + n] end  -- n: pace, flight, line, till, costs
local intervals = {}
local function arg(i, k)
  local given = tonumber(ARGV[9 + (i - 1) * 5 + k])
  if k > 2 then return given end
  local at = 2 * i + k
  if not intervals[at] then intervals[at] = paced(KEYS[5 * (i - 1) + 1], k == 1 and 'req' or 'tok', given) end
  return intervals[at]
end
local function leave(i, who)
  redis.call('ZREM', key(i, 3), who)
  redis.call('ZREM', key(i, 4), who)
  redis.call('HDEL', key(i, 5), who)
end
local function older(i)
  -- how many jobs in this scope's line came before this one, and the first one's cost
  -- (entries lapse unless their jobs come back to ask again)
  if not place or reserved then return 0, 0 end
  for _, gone in ipairs(redis.call('ZRANGEBYSCORE', key(i, 4), '-inf', now, 'LIMIT', 0, 100)) do
    leave(i, gone)
  end
  local count = redis.call('ZCOUNT', key(i, 3), '-inf', '(' .. ARGV[8])
  if count == 0 then return 0, 0 end
  local head = redis.call('ZRANGE', key(i, 3), 0, 0)[1]
  return count, tonumber(redis.call('HGET', key(i, 5), head) or '0')
end
for i = 1, scopes do
  local pace, flight = key(i, 1), key(i, 2)
  if arg(i, 5) > 0 then
    redis.call('ZREMRANGEBYSCORE', flight, '-inf', now)
    if not redis.call('ZSCORE', flight, id) and redis.call('ZCARD', flight) >= arg(i, 5) then
      for j = 1, scopes do  -- waiting for a slot, it keeps whatever place in line it has
        redis.call('ZADD', key(j, 4), 'XX', now + 1000 + tonumber(ARGV[9]), id)
      end
      return {'wait', '200', 'concurrency'}
    end
  end
  local ahead, head_cost = older(i)
  lates[i], aheads[i] = 0, ahead
  for k, field in ipairs({'req', 'tok'}) do
    if arg(i, k) > 0 and not reserved then
      -- pay before: the call's own cost must fit in the bucket (a call bigger than
      -- the burst fits once the bucket is full), after the older jobs in line; but
      -- budget free now, beyond what the head of the line needs, goes to whoever
      -- asks: unused, it would be lost
      local tat = math.max(tonumber(redis.call('HGET', pace, field) or '0'), now)
      local unit = arg(i, k) * (field == 'req' and 1 or cost)
      local kept = arg(i, k) * (field == 'req' and 1 or head_cost)
      local late = tat + unit - math.max(arg(i, k + 2), unit) - now
      if ahead > 0 and late + math.max(unit, kept) > 0 then
        late, behind = late + unit * ahead, true
      end
      lates[i] = math.max(lates[i], late)
      if late > wait then wait, reason = late, field == 'req' and 'requests' or 'tokens' end
    end
  end
end
if wait > 0 then  -- a job that must wait anyway takes no turn ahead of older ones
  for i = 1, scopes do
    if aheads[i] > 0 then behind, lates[i] = true, math.max(lates[i], 1) end
  end
end
local function queue_up()
  -- in the line of each scope it waits for, and only those: a job held by one model's
  -- limit must not hold up the other models under the same upstream
  if not place or reserved then return end
  for i = 1, scopes do
    if lates[i] > 0 then
      redis.call('ZADD', key(i, 3), 'NX', place, id)
      redis.call('ZADD', key(i, 4), now + wait + tonumber(ARGV[9]), id)
      redis.call('HSET', key(i, 5), id, cost)
      for n = 3, 5 do redis.call('PEXPIRE', key(i, n), 3600000) end
    else
      leave(i, id)
    end
  end
end
-- a token wait is pessimistic (reservations are settled with usage when calls end),
-- so far token turns are not reserved: the job looks again soon instead; and a job
-- behind older ones in line books nothing ahead of them
if wait > tonumber(ARGV[4]) or (reason == 'tokens' and wait > reserve) or behind then
  queue_up()
  return {'wait', tostring(wait), reason}
end
for i = 1, scopes do
  local pace, flight = key(i, 1), key(i, 2)
  for k, field in ipairs({'req', 'tok'}) do
    if arg(i, k) > 0 and not reserved then
      local tat = math.max(tonumber(redis.call('HGET', pace, field) or '0'), now)
      redis.call('HSET', pace, field, tostring(tat + arg(i, k) * (field == 'req' and 1 or cost)))
      redis.call('PEXPIRE', pace, 3600000)
      -- what the scope has reserved (``top`` shows its rate beside the budget); a float, so
      -- that no cost, however large, can make it fail
      redis.call('HINCRBYFLOAT', pace, 'used_' .. field, field == 'req' and 1 or cost)
    end
  end
  if arg(i, 5) > 0 and wait <= reserve then
    redis.call('ZADD', flight, now + wait + tonumber(ARGV[5]), id)
    redis.call('PEXPIRE', flight, 3600000)
  end
  leave(i, id)
end
return {'turn', tostring(wait), reason}
