"""The worker's background threads share one life: start, tick every so often, stop and join.

The watchdog, the reaper, the scheduler and the batch pump are each a
``Loop``; a tick that fails is logged, at most every ``_WARN_EVERY`` seconds per
loop (a Redis outage must not write ten lines a second), and the thread goes on.
"""

from __future__ import annotations

import logging
import threading
import time

import redis

from api_tasks.connections import reason

__all__ = ["Loop", "Throttled"]

_WARN_EVERY = 10.0  # seconds between two lines about the same trouble


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
                if isinstance(err, (redis.ConnectionError, redis.TimeoutError)):
                    self._trouble.warn("%s: Redis unavailable (%s)", self._thread.name, reason(err))
                else:
                    self._trouble.warn("%s: round failed (%s)", self._thread.name, err,
                                       trace=True)
