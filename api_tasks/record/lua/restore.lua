-- KEYS: job, running index, running messages. ARGV: job id, how long a lapsed lease is left
-- to its worker once a sweep has seen it (ms).
-- Takes a dead worker's job back, unless a live lease says it is still running: 'alive'
-- (left alone), 'lapsing' (its lease lapsed lately: left to its worker a while more,
-- ``lapsing``), 'ended' or 'waiting' (its message is to be dropped: it ended, or it was
-- parked for a limit and the delayed set sends it when due) or 'restored' (queued again, a
-- crash counted if it was running: its message is to go back on its queue,
-- ``unacked_return``; a job still queued was delivered and never claimed).
-- The broker's unacked entry is not touched here: it may live on another Redis.
local f = redis.call('HMGET', KEYS[1], 'status', 'token', 'lease_until', 'lapse_seen')
if lease_holder(f[2], f[3]) then return 'alive' end
local s = f[1]
if ended(s) then return 'ended' end
if s == 'waiting' then return 'waiting' end
if s == 'running' then
  if lapsing(KEYS[1], f[3], f[4], ARGV[2]) then return 'lapsing' end
  redis.call('HINCRBY', KEYS[1], 'crashes', 1)
  redis.call('HSET', KEYS[1], 'status', 'queued')
  redis.call('HDEL', KEYS[1], unpack(HELD))
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return 'restored'
