-- KEYS: batch, output, errors, output file, error file (all in the batch's shard), the
-- shard's set of active batches. ARGV: batch id, now, output bytes, error bytes, output file
-- id, error file id, file ttl; then the webhooks of its end (``add_webhooks``: KEYS from 7,
-- ARGV from 8). A finalizing batch (every line recorded, made through the Batches API) gets
-- its output and error files (each only if it has lines: records that read the batch's
-- lists; its caller then indexes them by owner) and ends as it was ending.
if redis.call('HGET', KEYS[1], 'status') ~= 'finalizing' then return 0 end
local owner = redis.call('HGET', KEYS[1], 'owner')
local created = tostring(math.floor(tonumber(ARGV[2])))
local expires = tostring(math.floor(tonumber(ARGV[2])) + tonumber(ARGV[7]))
local ids = {'', ''}
for i = 1, 2 do
  local size = tonumber(ARGV[2 + i])
  if size > 0 then
    local which = i == 1 and 'output' or 'errors'
    redis.call('HSET', KEYS[3 + i], 'filename', ARGV[1] .. '_' .. which .. '.jsonl',
               'bytes', ARGV[2 + i], 'purpose', 'batch_output', 'owner', owner,
               'created_at', created, 'expires_at', expires, 'batch', ARGV[1], 'list', which)
    redis.call('EXPIRE', KEYS[3 + i], ARGV[7])
    redis.call('EXPIRE', KEYS[1 + i], ARGV[7])
    ids[i] = ARGV[4 + i]
  end
end
local ending = redis.call('HGET', KEYS[1], 'ending')
redis.call('HSET', KEYS[1], 'status', ending, ending .. '_at', ARGV[2], 'finished_at', ARGV[2],
           'output_file_id', ids[1], 'error_file_id', ids[2])
redis.call('SREM', KEYS[6], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[7])
add_webhooks(7, 8)
return 1
