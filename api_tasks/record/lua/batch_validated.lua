-- KEYS: batch, staged marks, input, the input file's bytes.
-- ARGV: total, ttl, now, model, how long the file's bytes must last (s). A validating batch
-- whose file is checked: its marks become its input (input 'marks') and it starts, unless it was cancelled
-- (or another validation started it) meanwhile. The file's bytes, which it reads its lines
-- from, are kept until it can have ended, even if the file expires first.
local s = redis.call('HGET', KEYS[1], 'status')
if s ~= 'validating' then
  redis.call('DEL', KEYS[2])
  return s or 'missing'
end
redis.call('RENAME', KEYS[2], KEYS[3])
redis.call('HSET', KEYS[1], 'status', 'in_progress', 'total', ARGV[1], 'in_progress_at',
           ARGV[3], 'model', ARGV[4], 'input', 'marks')
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[3], ARGV[2])
local left = redis.call('TTL', KEYS[4])
if left >= 0 and left < tonumber(ARGV[5]) then redis.call('EXPIRE', KEYS[4], ARGV[5]) end
return 'in_progress'
