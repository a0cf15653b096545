-- Keep the sweeper role if this process holds it (its TTL set again), or take it if nobody
-- does: 1; else 0. KEYS[1] the role; ARGV[1] this process's token; ARGV[2] the TTL (ms)
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
