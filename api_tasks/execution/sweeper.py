"""One worker process of a cluster sweeps at a time: the holder of the sweeper role.

The scheduler, the batch pump and the webhook sender look at Redis several times a second.
Run by every worker, they cost Redis tens of commands a second for each idle process, and
the batch pump's per-batch locks grow with workers times batches. A process takes the role
with ``SET NX`` and keeps it by renewing it; the others ask again every ``_EVERY`` seconds, a
command each, so that when the holder dies another takes over within the role's TTL, and when
it stops it hands the role back at once.

Each part of the sweeping is a ``background.Sweep``: in the holder it sleeps between rounds on
a blocking pop of its own wake list, where whatever gives it work leaves a token
(``leave_wake`` in the Lua prelude), so an idle cluster costs Redis a command every ten
seconds per part.
"""

from __future__ import annotations

import logging
import time

import redis

from api_tasks.background import Loop
from api_tasks.record.keys import Keys
from api_tasks.record.scripts import script

__all__ = ["SweeperRole"]

log = logging.getLogger(__name__)
_EVERY = 3.0  # seconds between two asks (or renewals)
_TTL = 9.0  # seconds the role outlives its holder's last renewal
_MARGIN = 1.0  # the holder stops sweeping this long before its role could lapse


class SweeperRole(Loop):
    """A thread that takes the sweeper role when nobody holds it, and keeps it."""

    def __init__(self, client: redis.Redis, keys: Keys, token: str) -> None:
        super().__init__("api-tasks-sweeper", _EVERY, log)
        self._redis = client
        self._key = keys.sweeper()
        self._token = token
        self._keep = client.register_script(script("sweeper_keep"))
        self._release = client.register_script(script("unlock"))
        self._until = 0.0  # monotonic time until which the role is this process's
        self._ours_at = -_TTL  # when this process last had it confirmed

    @property
    def held(self) -> bool:
        """Whether this process sweeps now."""
        return time.monotonic() < self._until

    def start(self) -> None:
        """Ask at once (a lone worker sweeps from its start), then every few seconds."""
        try:
            self.tick()
        except redis.RedisError as err:  # the thread asks again
            log.warning("sweeper role: not asked for at start (%s)", err)
        super().start()

    def tick(self) -> None:
        asked = time.monotonic()
        ttl = int(_TTL * 1000)
        if asked - self._ours_at < _TTL:  # it may still be ours in Redis: keep it if so
            ours = bool(self._keep(keys=[self._key], args=[self._token, ttl]))
        else:  # a plain ask, the one command the processes that do not sweep send
            ours = bool(self._redis.set(self._key, self._token, nx=True, px=ttl))
        if ours:
            self._ours_at = asked
        if ours and not self.held:
            log.info("sweeper role taken: this worker sends due jobs, steps batches and "
                     "sends webhooks for the cluster")
        self._until = asked + _TTL - _MARGIN if ours else 0.0

    def stop(self, timeout: float = 2.0) -> None:
        """Stop asking, and hand the role back if held, for another process to take."""
        super().stop(timeout)
        if self.held or time.monotonic() - self._ours_at < _TTL:
            self._until = 0.0
            try:
                self._release(keys=[self._key], args=[self._token])
            except redis.RedisError as err:  # it lapses within its TTL
                log.warning("sweeper role: not handed back (%s)", err)
