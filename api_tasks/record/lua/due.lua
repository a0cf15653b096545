-- KEYS: delayed set, delayed messages. ARGV: limit, hold ms. Returns the due jobs with
-- their messages and holds each for ``hold`` ms (its score moves on, so no other worker
-- sends it meanwhile); a sender that dies before ``_SENT`` leaves it due again, not lost.
-- Last, in how many ms the next waiting job is due (by Redis's clock, which the workers'
-- need not share), or '' when none waits.
local now = now_ms()
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, ARGV[1])
local out = {}
for _, id in ipairs(ids) do
  local message = redis.call('HGET', KEYS[2], id)
  if message then
    local held = now + tonumber(ARGV[2])
    redis.call('ZADD', KEYS[1], held, id)
    table.insert(out, id)
    table.insert(out, message)
    table.insert(out, tostring(held))
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
table.insert(out, first[2] and tostring(tonumber(first[2]) - now) or '')
return out
