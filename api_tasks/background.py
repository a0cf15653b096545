"""The worker's background threads share one life: start, tick every so often, stop and join.

The watchdog, the reaper and the heartbeat are each a ``Loop``; the parts of the sweeping for
the cluster (the scheduler, the batch pump, the webhook sender) a ``Sweep``, which sleeps on
a wake list between rounds. A tick that fails is logged, at most every ``_WARN_EVERY``
seconds per loop (a Redis outage must not write ten lines a second), and the thread goes on.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

import redis

from api_tasks.connections import UNAVAILABLE, reason
from api_tasks.record.scripts import script

__all__ = ["Loop", "Sweep", "Throttled", "Turns", "each"]

T = TypeVar("T")
R = TypeVar("R")

_WARN_EVERY = 10.0  # seconds between two lines about the same trouble
_LONGEST = 10.0  # the longest one wait on a wake list (under the pool's socket timeout)
_LOOK_EVERY = 30.0  # a sweeping round runs this often at least, woken or not (a lost token)
_SHORTEST = 0.005  # a round due sooner than this runs now, not waited for
_TICK = 0.1  # seconds between two tries while Redis fails
_ROLE_EVERY = 1.0  # how often a part with nothing to do elsewhere sees whether it sweeps now


def each(items: Iterable[T], visit: Callable[[T], R]) -> tuple[list[R], Exception | None]:
    """``visit`` every item (a job shard, a batch): one whose Redis is out of reach (on a
    Redis Cluster, a primary down) keeps none of the others from theirs. The results, and
    the first such error, for the caller to raise once it has used them."""
    results: list[R] = []
    failed: Exception | None = None
    for item in items:
        try:
            results.append(visit(item))
        except UNAVAILABLE as err:
            failed = failed or err
    return results, failed


class Turns:
    """Job shards taken in turn, from a random one (so that processes starting together do
    not all look at the same shard first)."""

    def __init__(self) -> None:
        self._turn = random.randrange(1 << 16)

    def next(self, every: range) -> int:
        """The next shard of ``every``."""
        self._turn = (self._turn + 1) % len(every)
        return every[self._turn]


class Throttled:
    """Logs a warning at most every ``every`` seconds; the rest are dropped."""

    def __init__(self, log: logging.Logger, every: float = _WARN_EVERY) -> None:
        self._log = log
        self._every = every
        self._last = -every

    def warn(self, message: str, *args: object, trace: bool = False) -> None:
        """Log ``message`` unless one was logged less than ``every`` seconds ago."""
        now = time.monotonic()
        if now - self._last >= self._every:
            self._last = now
            self._log.warning(message, *args, exc_info=trace)


class Loop:
    """A daemon thread that calls ``tick`` every ``interval`` seconds until stopped."""

    def __init__(self, name: str, interval: float, log: logging.Logger) -> None:
        self._interval = interval
        self._log = log
        self._trouble = Throttled(log)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop after the current tick, and wait for it (at most ``timeout`` seconds)."""
        self._stopping.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def stopping(self) -> bool:
        """Whether ``stop`` was called."""
        return self._stopping.is_set()

    def tick(self) -> None:
        """One round of the loop's work."""
        raise NotImplementedError

    def pause(self) -> bool:
        """Wait for the next round (``interval`` seconds); True once stopping."""
        return self._stopping.wait(self._interval)

    def _run(self) -> None:
        while not self.pause():
            try:
                self.tick()
            except Exception as err:  # the thread must outlive any one bad round
                if isinstance(err, UNAVAILABLE):
                    self._trouble.warn("%s: Redis unavailable (%s)", self._thread.name, reason(err))
                else:
                    self._trouble.warn("%s: round failed (%s)", self._thread.name, err,
                                       trace=True)


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
        self._turns = Turns()  # the job shard the next round starts at

    def shards(self, every: range) -> list[int]:
        """The job shards this round visits, each round starting one on (a shard with a
        backlog does not hold the others back): every one in the process that sweeps; one
        elsewhere, so that a helper's look costs the same whatever the shard count (the
        helpers, starting at random ones, still cover them all between them)."""
        first = self._turns.next(every)
        if not self._sweeping():
            return [first]
        return [*every[first:], *every[:first]]

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
                    # should that fail, its holder's round within _LOOK_EVERY finds the work
                    with contextlib.suppress(redis.RedisError):
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
                self._log.debug("%s: no token left on stop (%s)", self._thread.name, err)
        super().stop(timeout)
