-- KEYS: job, cancel, events, running index, running messages, delayed set, delayed messages.
-- ARGV: now, ttl, token, lease_ms, max_crashes, the task message ('' = none), job id, the
-- deferral's margin ms, then field/value pairs for a job nobody recorded (a plain Celery
-- client's). The lease lives in the record while the job runs (``HELD``), and the reply too,
-- for a claim retried; the message is kept beside it (not in it: a value that long would
-- make the record a hash table for good), so that a job whose own message is lost can be
-- sent again.
-- A job held by another attempt, or whose lease lapsed lately (``lapsing``), is 'deferred':
-- its message waits in the delayed set until that lease would lapse (or, lapsed lately,
-- until its holder's time to renew it is over), so that a holder that gave its message back
-- without its lease (a failed give-back) cannot leave the job with no message; 'busy' if
-- there is no message to keep.
-- Returns {verdict, delivery, created_at, ms to a reserved turn or '',
-- whether the job's stream has events, the deployment and model of that turn (JSON) or '',
-- and for an ended job '1' when this delivery is the first to see an end no worker counted}.
local f = redis.call('HMGET', KEYS[1], 'status', 'created_at', 'turn_at', 'turn_on',
                     'deliveries', 'crashes', 'claimed', 'token', 'lease_until', 'lapse_seen')
local s, created = f[1], f[2] or ARGV[1]
local now = now_ms()
local turn = f[3] and tostring(tonumber(f[3]) - now) or ''
local on = turn ~= '' and f[4] or ''
-- only an earlier delivery can have written to the stream
local shown = f[5] and tostring(redis.call('EXISTS', KEYS[3])) or '0'
if ended(s) then
  local uncounted = s == 'cancelled' and redis.call('HDEL', KEYS[1], 'uncounted') == 1
  return {s, '0', created, turn, shown, on, uncounted and '1' or ''}
end
local holder = lease_holder(f[8], f[9])
-- a claim retried after a lost reply: the answer the first one got (its turn was cleared)
if holder == ARGV[3] then
  if f[7] then return cjson.decode(f[7]) end
  return {'run', f[5] or '1', created, turn, shown, on}
end
local due
if holder then
  due = tonumber(f[9])
elseif s == 'running' then  -- a lease that lapsed lately is left to its worker a lease period
  local seen = lapsing(KEYS[1], f[9], f[10], ARGV[4])
  if seen then due = seen + tonumber(ARGV[4]) end
end
if due then
  if ARGV[6] == '' then return {'busy', '0', created, turn, shown, on} end
  -- (over an entry the scheduler holds while it sends this very message: the score it moves
  -- tells ``sent`` to keep the entry)
  redis.call('ZADD', KEYS[6], due + tonumber(ARGV[8]), ARGV[7])
  redis.call('HSETNX', KEYS[7], ARGV[7], ARGV[6])
  redis.call('EXPIRE', KEYS[6], ARGV[2])
  redis.call('EXPIRE', KEYS[7], ARGV[2])
  return {'deferred', '0', created, turn, shown, on}
end
if not s then redis.call('HSET', KEYS[1], 'created_at', ARGV[1], unpack(ARGV, 9)) end
local n = tostring(tonumber(f[5] or '0') + 1)
local verdict = 'run'
if redis.call('EXISTS', KEYS[2]) == 1 then verdict = 'cancel'
elseif tonumber(f[6] or '0') >= tonumber(ARGV[5]) then
  verdict = 'poison'
end
local reply = {verdict, n, created, turn, shown, on}
local until_ms = now + tonumber(ARGV[4])
redis.call('HSET', KEYS[1], 'status', 'running', 'deliveries', n, 'started_at', ARGV[1],
           'token', ARGV[3], 'lease_until', until_ms, 'claimed', cjson.encode(reply))
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[4], until_ms, ARGV[7])
redis.call('EXPIRE', KEYS[4], ARGV[2])
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[5], ARGV[7], ARGV[6])
  redis.call('EXPIRE', KEYS[5], ARGV[2])
end
if f[3] or f[4] then redis.call('HDEL', KEYS[1], 'turn_at', 'turn_on') end
return reply
