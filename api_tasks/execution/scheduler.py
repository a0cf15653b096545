"""Send again, when they are due, the jobs waiting outside any worker.

A job parked for a limit (``api_tasks.execution.limits``) or a deferred
duplicate delivery waits in ``{prefix}:delayed``. Every worker runs a
scheduler; the one whose process holds the sweeper role (``sweeper.py``) sends
the due ones again. Rather than look a few times a second, it sleeps until the
next due job it knows of, on a blocking pop of a wake list where every script
that adds a waiting job leaves a token, so an idle cluster costs Redis about a
command a second.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import redis

from api_tasks.background import Loop
from api_tasks.record.keys import Keys
from api_tasks.record.leases import LeaseStore

__all__ = ["Scheduler", "Send"]

log = logging.getLogger(__name__)
Send = Callable[[str, dict[str, Any]], None]
_TICK = 0.1  # seconds between two tries while Redis fails
_IDLE = 1.0  # the longest one wait on the wake list (a stop waits at most this)
_CHECK = 10.0  # seconds between looks with no job known to wait (one added by hand, say)
_SHORTEST = 0.005  # a job due sooner than this is sent now, not waited for


class Scheduler(Loop):
    """A thread that sends the due waiting jobs' messages again when they are due."""

    def __init__(self, client: redis.Redis, keys: Keys, leases: LeaseStore, send: Send,
                 sweeping: Callable[[], bool] = lambda: True) -> None:
        super().__init__("api-tasks-scheduler", _TICK, log)
        self._redis = client
        self._keys = keys
        self._leases = leases
        self._send = send
        self._sweeping = sweeping  # whether this process sweeps for the cluster now
        # when the next waiting job is due (monotonic s; None: none waits)
        self._upcoming: float | None = 0.0
        self._looked = 0.0  # monotonic time of the last look

    def pause(self) -> bool:
        """Until the next waiting job is due, a token on the wake list (a job was added), or
        ``_CHECK`` seconds pass; True once stopping."""
        while not self._stopping.is_set():
            if not self._sweeping():
                self._upcoming = 0.0  # look at once when this process sweeps again
                if self._stopping.wait(_IDLE):
                    return True
                continue
            left = _IDLE if self._upcoming is None else self._upcoming - time.monotonic()
            if left < _SHORTEST or time.monotonic() - self._looked >= _CHECK:
                return False
            try:
                woken = self._redis.blpop([self._keys.delayed_wake()], timeout=min(left, _IDLE))
            except redis.RedisError:
                return self._stopping.wait(_TICK)  # the tick says what is wrong
            if woken is not None:
                return self._stopping.is_set()  # the token a stop leaves ends the wait too
        return True

    def stop(self, timeout: float = 2.0) -> None:
        """Stop, with a token on the wake list so that a wait there ends now (a shutdown's
        grace is seconds; the holder that comes next looks once more, for nothing)."""
        self._stopping.set()
        if self._sweeping():
            with contextlib.suppress(redis.RedisError):
                self._leases.wake()
        super().stop(timeout)

    def tick(self) -> None:
        """Send the due jobs, if this process sweeps for the cluster."""
        if not self._sweeping():
            return
        self._looked = time.monotonic()
        self._upcoming = self._looked + _TICK  # a failed look is tried again soon
        due, upcoming = self._leases.due()
        self._upcoming = None if upcoming is None else self._looked + upcoming
        for job_id, message, held in due:
            try:
                self._send(job_id, message)
            except Exception as err:
                log.error("scheduler: could not send job %s again (%s); will retry", job_id, err)
                self._upcoming = time.monotonic() + _TICK  # it is due again soon
                with contextlib.suppress(redis.RedisError):  # else it is due when held ends
                    self._leases.sent(job_id, held, ok=False)
                continue
            try:
                self._leases.sent(job_id, held)
            except redis.RedisError as err:  # due again when held ends: sent twice at worst
                log.warning("scheduler: job %s sent, but not marked sent (%s)", job_id, err)
