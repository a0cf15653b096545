-- On the broker's Redis. KEYS: kombu's unacked index, unacked hash, the message's queue.
-- ARGV: delivery tag, the message ('' = drop it). Puts a dead worker's message back at the
-- front of its queue, as kombu's restore does, and takes its unacked entry out so it never
-- comes back a second time. Sent even if the entry went meanwhile (the restore took the job
-- back already): a duplicate is dropped by the claim, a lost message would be a lost job.
if ARGV[2] ~= '' then redis.call('RPUSH', KEYS[3], ARGV[2]) end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
