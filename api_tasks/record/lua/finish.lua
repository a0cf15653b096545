-- KEYS: job, result, events, running index, running messages, then (with a delivery tag)
-- kombu's unacked index and unacked hash, then the webhooks of its end (``add_webhooks``).
-- ARGV: token ('' = whoever holds it, for the last-resort failure), ttl, event, wanted entry
-- id, result ('' for none), job id, its pub/sub channel, the delivery's tag ('' for none: the
-- broker apart), how many job field/value items follow, those items, then the webhooks' ARGV.
-- A job already ended is never written twice. Stream entries keep the event in field 'event'
-- (events.EVENT_FIELD). With a tag, the delivery's unacked entry goes too, as kombu's ack
-- would, once the finish ran or found the job ended or held by another attempt; never when
-- it did not run (a Redis out of memory refuses its first write), so a requeue finds it.
local tag = ARGV[8]
local function acked()
  if tag ~= '' then
    redis.call('ZREM', KEYS[6], tag)
    redis.call('HDEL', KEYS[7], tag)
  end
end
local held = redis.call('HMGET', KEYS[1], 'status', 'token')
if ended(held[1]) then
  acked()
  return 'ended'
end
if ARGV[1] ~= '' and held[2] ~= ARGV[1] then
  acked()
  return 'lost'
end
add_entry(KEYS[3], ARGV[4], 'event', ARGV[3])  -- first: the one write that may be refused
local fields = tonumber(ARGV[9])
local set = {unpack(ARGV, 10, 9 + fields)}
if ARGV[1] ~= '' then
  set[#set + 1] = 'ended_by'
  set[#set + 1] = ARGV[1]
end
redis.call('HSET', KEYS[1], unpack(set))
redis.call('HDEL', KEYS[1], unpack(HELD))
redis.call('ZREM', KEYS[4], ARGV[6])
redis.call('HDEL', KEYS[5], ARGV[6])
redis.call('EXPIRE', KEYS[1], ARGV[2])
if ARGV[5] ~= '' then redis.call('SET', KEYS[2], ARGV[5], 'EX', ARGV[2]) end
redis.call('EXPIRE', KEYS[3], ARGV[2])
redis.call('PUBLISH', ARGV[7], ARGV[3])
acked()
add_webhooks(tag ~= '' and 8 or 6, 10 + fields)
return 'ok'
