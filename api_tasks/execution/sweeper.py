"""One worker process of a cluster sweeps at a time: the holder of the sweeper role.

The scheduler, the batch pump and the webhook sender look at Redis several times a second.
Run by every worker, they cost Redis tens of commands a second for each idle process, and
the batch pump's per-batch locks grow with workers times batches. A process takes the role
with ``SET NX`` and keeps it by renewing it; the others ask again every ``_EVERY`` seconds, a
command each, so that when the holder dies another takes over within the role's TTL, and when
it stops it hands the role back at once.

Each part of the sweeping is a ``Sweep``: in the holder it sleeps between rounds on a blocking
pop of its own wake list, where whatever gives it work leaves a token (``leave_wake`` in the
Lua prelude), so an idle cluster costs Redis a command every ``_LONGEST`` seconds per part.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis

from api_tasks.background import Loop
from api_tasks.record.keys import Keys
from api_tasks.record.scripts import script

__all__ = ["Sweep", "SweeperRole"]

log = logging.getLogger(__name__)
_EVERY = 3.0  # seconds between two asks (or renewals)
_TTL = 9.0  # seconds the role outlives its holder's last renewal
_MARGIN = 1.0  # the holder stops sweeping this long before its role could lapse
_LONGEST = 10.0  # the longest one wait on a wake list (under the pool's socket timeout)
_LOOK_EVERY = 30.0  # a sweeping round runs this often at least, woken or not (a lost token)
_SHORTEST = 0.005  # a round due sooner than this runs now, not waited for
_TICK = 0.1  # seconds between two tries while Redis fails
_ROLE_EVERY = 1.0  # how often a part with nothing to do elsewhere sees whether it sweeps now


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


class Sweep(Loop):
    """A part of the sweeper role's work, as a thread. In the process that sweeps, a round runs
    when the last one said (``sweep``'s return), when a token lands on the part's wake list,
    or every ``_LOOK_EVERY`` seconds; elsewhere every ``helper`` seconds, or never (None)."""

    def __init__(self, name: str, client: redis.Redis, wake: str, wake_ttl: int,
                 sweeping: Callable[[], bool], helper: float | None,
                 log: logging.Logger) -> None:
        super().__init__(name, _TICK, log)
        self._waits = client  # blocking waits: its socket timeout is above _LONGEST
        self._wake = wake
        self._wake_ttl = wake_ttl
        self._sweeping = sweeping  # whether this process sweeps for the cluster now
        self._helper = helper
        self._leave = client.register_script(script("wake"))
        self._next: float | None = 0.0  # monotonic time the next round is due (None: woken)
        self._swept_at = 0.0  # monotonic time of the last round

    def sweep(self) -> float | None:
        """One round; in how many seconds the next is due (None: when woken)."""
        raise NotImplementedError

    def tick(self) -> None:
        self._swept_at = time.monotonic()
        self._next = self._swept_at + _TICK  # a round that fails is tried again soon
        due_in = self.sweep()
        self._next = None if due_in is None else time.monotonic() + due_in

    def pause(self) -> bool:
        """Until the next round is due, a token on the wake list, or ``_LOOK_EVERY`` seconds
        pass (in the process that sweeps; else ``helper`` seconds); True once stopping."""
        while not self._stopping.is_set():
            if not self._sweeping():
                self._next = 0.0  # a round at once when this process sweeps again
                if self._helper is not None:
                    return self._stopping.wait(self._helper)
                if self._stopping.wait(_ROLE_EVERY):
                    return True
                continue
            now = time.monotonic()
            left = _LOOK_EVERY - (now - self._swept_at)
            if self._next is not None:
                left = min(left, self._next - now)
            if left < _SHORTEST:
                return False
            try:
                woken = self._waits.blpop([self._wake], timeout=min(left, _LONGEST))
            except redis.RedisError:
                return self._stopping.wait(_TICK)  # the round says what is wrong
            if woken is not None:
                if not self._sweeping():  # the role moved on meanwhile: the token is its
                    self.wake()
                    continue
                return self._stopping.is_set()  # the token a stop leaves ends the wait too
        return True

    def wake(self) -> None:
        """Leave a token on this part's wake list: the sweeping process's wait ends now."""
        self._leave(keys=[self._wake], args=[self._wake_ttl])

    def stop(self, timeout: float = 2.0) -> None:
        """Stop, with a token on the wake list so that this process's wait there ends now (a
        shutdown's grace is seconds; the holder that comes next runs a round, for nothing)."""
        self._stopping.set()
        if self._sweeping():
            try:
                self.wake()
            except redis.RedisError as err:  # the wait ends within _LONGEST
                log.debug("%s: no token left on stop (%s)", self._thread.name, err)
        super().stop(timeout)
