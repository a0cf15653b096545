"""The Redis record of a job and its streams: keys, the job hash, leases, events, the
event writer, the Lua scripts, and the reader (``Job``)."""
