-- KEYS: an owner's index (of jobs, files or batches). ARGV: the id, how long anything it
-- names lives (s). The index stays as small as the owner's live ids (``index_by_owner``).
index_by_owner(KEYS[1], ARGV[1], ARGV[2])
return 1
