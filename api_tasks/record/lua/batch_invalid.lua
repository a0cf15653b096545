-- KEYS: batch, staged input, the set of active batches. ARGV: batch id, now, errors (JSON),
-- ttl; then its webhooks (``add_webhooks``: KEYS from 4, ARGV from 5). A validating batch
-- whose input file was refused ends failed; nothing ran.
redis.call('DEL', KEYS[2])
if redis.call('HGET', KEYS[1], 'status') ~= 'validating' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'failed', 'failed_at', ARGV[2], 'finished_at', ARGV[2],
           'errors', ARGV[3])
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
add_webhooks(4, 5)
return 1
