-- KEYS: jobs. ARGV: job ids now sent.
for i = 1, #ARGV do
  local v = redis.call('HGET', KEYS[1], ARGV[i])
  if v and string.sub(v, 1, 2) == 'u:' then
    redis.call('HSET', KEYS[1], ARGV[i], 's:' .. string.sub(v, 3))
  end
end
