-- KEYS: an owner's index (of jobs or files). ARGV: the id to start after ('' for the first),
-- how many, and 'asc' for oldest first (else newest first). Replies the ids; false when the
-- start id is not in the index.
local asc = ARGV[3] == 'asc'
local first = 0
if ARGV[1] ~= '' then
  local rank
  if asc then rank = redis.call('ZRANK', KEYS[1], ARGV[1])
  else rank = redis.call('ZREVRANK', KEYS[1], ARGV[1]) end
  if not rank then return false end
  first = rank + 1
end
local last = first + tonumber(ARGV[2]) - 1
if asc then return redis.call('ZRANGE', KEYS[1], first, last) end
return redis.call('ZREVRANGE', KEYS[1], first, last)
