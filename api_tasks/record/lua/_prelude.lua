-- Put before every script by api_tasks/record/scripts.py (with ended(status), built from
-- api_tasks.record.job_record.TERMINAL): the helpers the scripts share.

-- The server's clock in milliseconds (scripts replicate their effects, so TIME is allowed).
local function now_ms()
  local t = redis.call('TIME')
  return t[1] * 1000 + math.floor(t[2] / 1000)
end

-- The entry id to add to stream `key`: `wanted` ('<attempt>-<seq>'), or, if the stream
-- already holds that id or a later one, the id just after its last entry.
local function next_entry_id(key, wanted)
  local last = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)[1]
  if not last then return wanted end
  local la, ls = string.match(last[1], '(%d+)-(%d+)')
  local wa, ws = string.match(wanted, '(%d+)-(%d+)')
  la, ls, wa, ws = tonumber(la), tonumber(ls), tonumber(wa), tonumber(ws)
  if wa < la or (wa == la and ws <= ls) then return la .. '-' .. (ls + 1) end
  return wanted
end
