"""Upstream-wide back-off shared by every worker: the 429 cool-down.

When an upstream answers 429 (rate limited, not out of quota), the wait it
asked for applies to the whole upstream, not just to the job that got it:
every worker on every machine holds its next call to that upstream until
the cool-down key in Redis expires.
"""

from __future__ import annotations

import redis

from api_tasks.keys import Keys

__all__ = ["Cooldowns"]

# KEYS: cooldown. ARGV: ms. Only ever lengthens a cool-down, never shortens one.
_COOL = """
local left = redis.call('PTTL', KEYS[1])
if left < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], '1', 'PX', ARGV[1]) end
return 1
"""


class Cooldowns:
    """Reads and sets each upstream's cool-down."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.redis = client
        self.keys = keys
        self._cool = client.register_script(_COOL)

    def start(self, upstream: str, seconds: float) -> None:
        """Hold every call to ``upstream`` for ``seconds`` (or longer, if already held)."""
        if seconds > 0:
            self._cool(keys=[self.keys.cooldown(upstream)], args=[max(int(seconds * 1000), 1)])

    def left(self, upstream: str) -> float:
        """Seconds until calls to ``upstream`` may go again (0 when not cooling down)."""
        millis = int(self.redis.pttl(self.keys.cooldown(upstream)))
        return millis / 1000 if millis > 0 else 0.0
