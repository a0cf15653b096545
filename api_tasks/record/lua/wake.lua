-- KEYS: a sweeping part's wake list. ARGV: its ttl. A token on it, so that a wait there ends.
leave_wake(KEYS[1], ARGV[1])
