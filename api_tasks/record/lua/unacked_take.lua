-- On the broker's Redis: kombu's BRPOP and its unacked entry in one step, for a worker whose
-- queues had more than it took. KEYS: kombu's unacked index, its unacked hash, then the
-- queues' lists in BRPOP's order. ARGV: now (kombu's clock, seconds), how many to take, the
-- most bytes a message may have (0: any), then for a message BRPOP popped already its
-- delivery tag and its unacked entry. Records that message, then takes up to that many more
-- off the first list that has any (from the right, as BRPOP), each recorded as kombu's own
-- append would (its entry: the message, its exchange and its routing key); it stops at one
-- it cannot record (its properties not last, say), left for BRPOP and kombu's own append, and
-- past a few MB. The writes come before the list is trimmed, so a Redis out of memory
-- refuses the step whole. Returns {} or {list, {message, tag, bytes, ...}}: message and tag
-- '' for one dropped for its size.

-- The properties of a kombu envelope, its last member, read from the tail (the body before
-- them may be large); nil if they are not found there whole.
local function properties(item)
  local from, at = math.max(1, #item - 1024), nil
  while true do
    local found = string.find(item, '"properties":', from, true)
    if not found then break end
    at, from = found, found + 1
  end
  local close = at and string.find(item, '}%s*$', at)
  if not close then return nil end
  local ok, p = pcall(cjson.decode, string.sub(item, at + 13, close - 1))
  if ok and type(p) == 'table' then return p end
  return nil
end

local BUDGET = 4194304  -- bytes a take hands out at most (past its first message)

if ARGV[4] then
  redis.call('ZADD', KEYS[1], ARGV[1], ARGV[4])
  redis.call('HSET', KEYS[2], ARGV[4], ARGV[5])
end
local want, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
-- (one look at all the lists: after a BRPOP they are most often empty)
if want < 1 or #KEYS < 3 or redis.call('EXISTS', unpack(KEYS, 3)) == 0 then return {} end
for i = 3, #KEYS do
  local items = redis.call('LRANGE', KEYS[i], -want, -1)
  if #items > 0 then
    local out, taken, bytes = {}, 0, 0
    for j = #items, 1, -1 do
      local item = items[j]
      if limit > 0 and #item > limit then
        out[#out + 1] = ''
        out[#out + 1] = ''
      else
        local p = properties(item)
        local d = p and p.delivery_info
        if not (p and type(p.delivery_tag) == 'string' and type(d) == 'table'
                and type(d.exchange) == 'string' and type(d.routing_key) == 'string') then
          break  -- left on the list: BRPOP and kombu's own append take it
        end
        redis.call('ZADD', KEYS[1], ARGV[1], p.delivery_tag)
        redis.call('HSET', KEYS[2], p.delivery_tag, '[' .. item .. ', '
                   .. cjson.encode(d.exchange) .. ', ' .. cjson.encode(d.routing_key) .. ']')
        out[#out + 1] = item
        out[#out + 1] = p.delivery_tag
        bytes = bytes + #item
      end
      out[#out + 1] = #item
      taken = taken + 1
      if bytes >= BUDGET then break end
    end
    if taken > 0 then redis.call('LTRIM', KEYS[i], 0, -(taken + 1)) end
    return {KEYS[i], out}
  end
end
return {}
