-- The helpers the scripts share: api_tasks/record/scripts.py puts before each script those it
-- names (and ended(status), built from api_tasks.record.job_record.TERMINAL). Blocks are a
-- blank line apart.

-- The server's clock in milliseconds (scripts replicate their effects, so TIME is allowed),
-- read once a script: a script runs in an instant.
local clock_ms
local function now_ms()
  if not clock_ms then
    local t = redis.call('TIME')
    clock_ms = t[1] * 1000 + math.floor(t[2] / 1000)
  end
  return clock_ms
end

-- Leave a token on a sweeping part's wake list `key` (at most one is kept, for `ttl` seconds):
-- the scheduler, the batch pump and the webhook sender of the process that sweeps sleep on
-- theirs until their next due work (``Sweep`` in api_tasks/background.py), so whatever gives them
-- work says so.
local function leave_wake(key, ttl)
  redis.call('LPUSH', key, '1')
  redis.call('LTRIM', key, 0, 0)
  redis.call('EXPIRE', key, ttl)
end

-- Add `value` under `field` to stream `key` at id `wanted` ('<attempt>-<seq>'), or, if the
-- stream already holds that id or a later one, just after its last entry. The wanted id is
-- tried first: it is free but for a writer that went on after a lost reply, so the stream's
-- last entry is seldom read.
local function add_entry(key, wanted, field, value)
  local added = redis.pcall('XADD', key, wanted, field, value)
  if type(added) ~= 'table' or not added.err then return added end
  local last = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)[1]
  if not last then return redis.call('XADD', key, wanted, field, value) end  -- its own error
  local la, ls = string.match(last[1], '(%d+)-(%d+)')
  return redis.call('XADD', key, la .. '-' .. (tonumber(ls) + 1), field, value)
end

-- The attempt holding a job: the token in its record while the lease beside it has not
-- lapsed (``lease_until``, ms by this clock, which a renewal moves on), else nil.
local function lease_holder(token, lease_until)
  if token and lease_until and tonumber(lease_until) > now_ms() then return token end
  return nil
end

-- What a job's record holds only while an attempt runs it: its token and lease, and when a
-- sweep or a delivery first saw that lease lapsed (the helper below).
local HELD = {'token', 'lease_until', 'lapse_seen'}

-- Whether ``lapse_seen`` (`seen`) notes the lapse of the lease that ends at `lease_until`, not
-- that of an earlier lease since renewed.
local function lapse_noted(lease_until, seen)
  return seen and tonumber(seen) >= tonumber(lease_until or '0') or false
end

-- Whether a running job whose lease lapsed is still left to its worker: the sweep or
-- delivery that first sees the lapse notes when in the record (``lapse_seen``), and the job
-- is taken (given back, sent again or claimed) only once it has stayed lapsed `wait` ms
-- since. A worker alive but kept from renewing by an outage renews it meanwhile (which moves
-- ``lease_until`` past the note); and whichever process looks next knows, since the record
-- says it. Returns when the lapse was first seen (ms) while the job is left to its worker,
-- else nil.
local function lapsing(job, lease_until, seen, wait)
  if not lapse_noted(lease_until, seen) then
    local now = now_ms()
    redis.call('HSET', job, 'lapse_seen', now)
    return now
  end
  if now_ms() - tonumber(seen) < tonumber(wait) then return tonumber(seen) end
  return nil
end

-- A limit's interval (ms per request or token) in pacing hash `pace`: the configured one, the
-- upstream's own when its headers said its limit is lower, or slower still while other
-- callers on the same key use part of it (``observe`` estimates their share, and the
-- estimate holds for OTHERS_FOR ms after its last measure); 0: no limit.
local OTHERS_FOR = 300000
local function paced(pace, field, configured)
  if configured <= 0 then return 0 end
  local own = redis.call('HMGET', pace, field .. '_iv', field .. '_oiv', field .. '_oat')
  local interval = math.max(configured, tonumber(own[1] or '0'))
  if own[2] and tonumber(own[3]) + OTHERS_FOR > now_ms() then
    interval = math.max(interval, tonumber(own[2]))
  end
  return interval
end

-- Add `id` to an owner's index (a sorted set) by the time now in microseconds (in
-- milliseconds, ids added in the same one would list in id order, not in the order added);
-- entries older than `ttl` seconds, older than anything they name can be, are dropped.
local function index_by_owner(key, id, ttl)
  local t = redis.call('TIME')
  local now = t[1] * 1000000 + t[2]
  redis.call('ZADD', key, now, id)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - tonumber(ttl) * 1000000)
  redis.call('EXPIRE', key, ttl)
end

-- Queue webhook deliveries (api_tasks/execution/webhooks.py sends them) with the state change
-- that causes them, so each is sent at least once. KEYS[k]: the shard's pending set, then one
-- hash per delivery; ARGV from a: payload, owner, now (ms), ttl, then each delivery's id and
-- endpoint index. Nothing when KEYS[k] is absent. Its caller then indexes them by owner and
-- wakes the sender (``Webhooks.after``).
local function add_webhooks(k, a)
  if not KEYS[k] then return end
  for i = k + 1, #KEYS do
    local j = a + 4 + 2 * (i - k - 1)
    redis.call('HSET', KEYS[i], 'payload', ARGV[a], 'owner', ARGV[a + 1], 'endpoint',
               ARGV[j + 1], 'attempts', 0, 'first_at', ARGV[a + 2], 'status', 'pending')
    redis.call('EXPIRE', KEYS[i], ARGV[a + 3])
    redis.call('ZADD', KEYS[k], ARGV[a + 2], ARGV[j])
  end
  redis.call('EXPIRE', KEYS[k], ARGV[a + 3])
end
