"""Find jobs whose worker died, and send them again.

Celery's Redis transport gives a dead worker's unacked messages back only
after the visibility timeout (an hour or more, since it must exceed the
longest job). Instead, every worker runs a reaper; one at a time (a lock in
Redis) looks for running jobs whose lease lapsed and whose worker's heartbeat
is gone, marks them queued and re-sends their task message. When the
original message comes back later, its claim sees the job finished or held
and drops it, so the job still has exactly one outcome.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import redis

from api_tasks.keys import Keys
from api_tasks.leases import LeaseStore

__all__ = ["Reaper"]

log = logging.getLogger(__name__)
Send = Callable[[str, dict[str, Any]], None]


class Reaper:
    """A thread that re-sends orphaned jobs every ``interval`` seconds."""

    def __init__(self, client: redis.Redis, keys: Keys, leases: LeaseStore,
                 interval: float, send: Send) -> None:
        self._redis = client
        self._keys = keys
        self._leases = leases
        self._interval = interval
        self._send = send
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="api-tasks-reaper", daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread after its current sweep."""
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.sweep()
            except redis.RedisError as err:
                log.warning("reaper: Redis unavailable (%s)", err)
            except Exception:  # the thread must outlive any one bad sweep
                log.exception("reaper: sweep failed")

    def sweep(self) -> int:
        """One pass, if no other worker is sweeping; returns how many jobs were re-sent."""
        lock_ms = max(int(self._interval * 1000), 1000)
        if not self._redis.set(self._keys.reaper_lock(), "1", nx=True, px=lock_ms):
            return 0
        sent = 0
        for job_id in self._leases.expired():
            message = self._leases.take_orphan(job_id)
            if message is not None and self._resend(job_id, message):
                sent += 1
        return sent

    def _resend(self, job_id: str, message: dict[str, Any]) -> bool:
        try:
            self._send(job_id, message)
        except Exception as err:
            log.error("reaper: could not re-send job %s (%s); will retry", job_id, err)
            pipe = self._redis.pipeline(transaction=False)
            pipe.hset(self._keys.job(job_id), "status", "running")
            pipe.zadd(self._keys.leases(), {job_id: 0})
            pipe.execute()
            return False
        log.warning("reaper: job %s lost its worker; sent again", job_id)
        return True
