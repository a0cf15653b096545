-- KEYS: batch, then the webhooks of an immediate end (``add_webhooks``: KEYS from 2, ARGV
-- from 2). ARGV: now. A batch still uploading or validating has sent nothing: it ends at
-- once; a running one is the pump's to stop (its caller wakes the pump).
local s = redis.call('HGET', KEYS[1], 'status')
if not s then return 'missing' end
if s == 'uploading' or s == 'validating' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'cancelled_at', ARGV[1],
             'finished_at', ARGV[1])
  add_webhooks(2, 2)
  return 'cancelled'
end
if s ~= 'in_progress' then return s end
redis.call('HSET', KEYS[1], 'status', 'cancelling', 'cancelled_at', ARGV[1], 'cancelling_at',
           ARGV[1])
return 'cancelling'
