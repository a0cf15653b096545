"""A worker process's heartbeat: its liveness record renewed every few seconds."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import redis

from api_tasks.background import Loop
from api_tasks.connections import reason
from api_tasks.record.calls import SyncShell
from api_tasks.record.keys import Keys
from api_tasks.record.workers import HEARTBEAT_EVERY, beat, gone

__all__ = ["Heartbeat"]

log = logging.getLogger(__name__)
_TIDY_EVERY = 5  # beats between two tidyings of the workers index


class Heartbeat(Loop):
    """A thread that records this worker alive (one round trip every ``HEARTBEAT_EVERY``)."""

    def __init__(self, client: redis.Redis, keys: Keys, worker_id: str,
                 concurrency: int, status: Callable[[], dict[str, Any]] | None = None) -> None:
        super().__init__("api-tasks-heartbeat", HEARTBEAT_EVERY, log)
        self._shell = SyncShell(client)
        self._keys = keys
        self._worker_id = worker_id
        self._info: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(),
                                      "concurrency": concurrency, "started_at": time.time()}
        self._status = status  # what changes: jobs running, ended, recent failures
        self._beats = 0

    def note(self, **info: Any) -> None:
        """Say more of this worker in its record from now on (its metrics port...)."""
        self._info.update(info)

    def start(self) -> None:
        """Record this worker at once, then every few seconds."""
        try:
            self.tick()
        except redis.RedisError as err:  # the loop goes on trying
            log.warning("heartbeat: Redis unavailable (%s)", reason(err))
        super().start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop, and take this worker's record out at once (a probe sees it gone)."""
        super().stop(timeout)
        with contextlib.suppress(redis.RedisError):  # else it lapses in a few seconds
            self._shell.run_all(gone(self._keys, self._worker_id))

    def tick(self) -> None:
        """Renew this worker's liveness record."""
        info = self._info if self._status is None else {**self._info, **self._status()}
        self._shell.run_all(beat(self._keys, self._worker_id, info,
                                 tidy=self._beats % _TIDY_EVERY == 0))
        self._beats += 1
