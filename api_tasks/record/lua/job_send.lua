-- KEYS: a lane's list of task messages. ARGV: the message. A script, not a bare LPUSH, so a
-- Redis that lost its scripts refuses a submit whole: its record comes first, then this.
return redis.call('LPUSH', KEYS[1], ARGV[1])
