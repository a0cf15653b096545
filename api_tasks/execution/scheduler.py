"""Send again, when they are due, the jobs waiting outside any worker.

A job parked for a limit (``api_tasks.execution.limits``) or a deferred
duplicate delivery waits in its shard's ``{prefix}:delayed:{s<n>}``. Every worker runs a
scheduler; the one whose process holds the sweeper role (``sweeper.py``) sends
the due ones again. Rather than look a few times a second, it sleeps until the
next due job it knows of, on a blocking pop of a wake list where every script
that adds a waiting job leaves a token (``background.Sweep``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import redis

from api_tasks.background import Sweep, each
from api_tasks.job_logs import job_context
from api_tasks.record.keys import Keys
from api_tasks.record.leases import LeaseStore

__all__ = ["Scheduler", "Send"]

log = logging.getLogger(__name__)
Send = Callable[[str, dict[str, Any]], None]
_RETRY = 0.1  # seconds before a due job whose send failed is tried again


class Scheduler(Sweep):
    """A thread that sends the due waiting jobs' messages again when they are due."""

    def __init__(self, client: redis.Redis, keys: Keys, leases: LeaseStore, send: Send,
                 sweeping: Callable[[], bool] = lambda: True) -> None:
        super().__init__("api-tasks-scheduler", client, keys.delayed_wake(), leases.queued_ttl,
                         sweeping, None, log)
        self._keys = keys
        self._leases = leases
        self._send = send

    def sweep(self) -> float | None:
        """Send the due jobs, if this process sweeps for the cluster; when the next is due."""
        if not self._sweeping():
            return 0.0
        found, failed = each(self._keys.every_shard, self._send_due)
        if failed is not None:  # the other shards' due jobs went; this round is tried again
            raise failed
        return min((soonest for soonest in found if soonest is not None), default=None)

    def _send_due(self, shard: int) -> float | None:
        """Send a shard's due jobs; when its next is due."""
        due, upcoming = self._leases.due(shard)
        for job_id, message, held in due:
            try:
                self._send(job_id, message)
            except Exception as err:
                with job_context(job_id):  # a JSON line names its job in a field too
                    log.error("scheduler: could not send job %s again (%s); will retry",
                              job_id, err)
                upcoming = _RETRY  # it is due again soon
                with contextlib.suppress(redis.RedisError):  # else it is due when held ends
                    self._leases.sent(job_id, held, ok=False)
                continue
            try:
                self._leases.sent(job_id, held)
            except redis.RedisError as err:  # due again when held ends: sent twice at worst
                with job_context(job_id):
                    log.warning("scheduler: job %s sent, but not marked sent (%s)", job_id,
                                err)
        return upcoming
