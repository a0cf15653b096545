-- KEYS: an owner's index of jobs. ARGV: the job id to start after ('' for the newest),
-- how many. Replies the ids, newest first; false when the start id is not in the index.
local first = 0
if ARGV[1] ~= '' then
  local rank = redis.call('ZREVRANK', KEYS[1], ARGV[1])
  if not rank then return false end
  first = rank + 1
end
return redis.call('ZREVRANGE', KEYS[1], first, first + tonumber(ARGV[2]) - 1)
