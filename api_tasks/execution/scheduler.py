"""Send again, when they are due, the jobs waiting outside any worker.

A job parked for a limit (``api_tasks.execution.limits``) or a deferred
duplicate delivery waits in ``{prefix}:delayed``. Every worker runs a
scheduler; one at a time (a lock in Redis) looks a few times a second, since a
waiting job's turn is rarely far off, and sends the due ones again.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import redis

from api_tasks.background import Loop
from api_tasks.record.keys import Keys
from api_tasks.record.leases import LeaseStore

__all__ = ["Scheduler", "Send"]

log = logging.getLogger(__name__)
Send = Callable[[str, dict[str, Any]], None]
_TICK = 0.1  # seconds between looks at the waiting jobs


class Scheduler(Loop):
    """A thread that sends the due waiting jobs' messages again, a few times a second."""

    def __init__(self, client: redis.Redis, keys: Keys, leases: LeaseStore, send: Send) -> None:
        super().__init__("api-tasks-scheduler", _TICK, log)
        self._redis = client
        self._keys = keys
        self._leases = leases
        self._send = send

    def tick(self) -> None:
        """Send the due jobs, if no other worker is sending them right now."""
        if not self._redis.set(self._keys.scheduler_lock(), "1", nx=True, px=int(_TICK * 1000)):
            return
        for job_id, message, held in self._leases.due():
            try:
                self._send(job_id, message)
            except Exception as err:
                log.error("scheduler: could not send job %s again (%s); will retry", job_id, err)
                with contextlib.suppress(redis.RedisError):  # else it is due when held ends
                    self._leases.sent(job_id, held, ok=False)
                continue
            try:
                self._leases.sent(job_id, held)
            except redis.RedisError as err:  # due again when held ends: sent twice at worst
                log.warning("scheduler: job %s sent, but not marked sent (%s)", job_id, err)
