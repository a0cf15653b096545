-- KEYS: job, delayed set, delayed messages (its caller then wakes the scheduler).
-- ARGV: job id, message, margin ms, ttl, lease ms.
-- A delivery that found the job held by another attempt: the job is looked at again when
-- that lease would lapse (or, lapsed lately, once its holder's time to renew it is over,
-- as the claim noted), so a holder that gave its message back without its lease (a failed
-- give-back) cannot leave the job with no message. Returns 1, or 0 if the lease is already
-- gone (claim again).
local f = redis.call('HMGET', KEYS[1], 'token', 'lease_until', 'lapse_seen', 'status')
local due
if lease_holder(f[1], f[2]) then
  due = tonumber(f[2])
elseif f[4] == 'running' and lapse_noted(f[2], f[3]) then
  due = tonumber(f[3]) + tonumber(ARGV[5])
  if due <= now_ms() then return 0 end
else
  return 0
end
due = due + tonumber(ARGV[3])
-- (over an entry the scheduler holds while it sends this very message: the score it moves
-- tells ``sent`` to keep the entry)
redis.call('ZADD', KEYS[2], due, ARGV[1])
redis.call('HSETNX', KEYS[3], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('EXPIRE', KEYS[3], ARGV[4])
return 1
