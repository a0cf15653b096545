"""Give back the messages of jobs whose worker died.

Celery's Redis transport keeps every delivered, unacked message in Redis and
hands a dead worker's messages out again only after the visibility timeout
(an hour or more, since it must exceed the longest job). Instead, the
worker that sweeps for the cluster (``sweeper.py``) looks at unacked
messages older than two lease periods. A message whose job holds no lease
has lost its worker: it goes back to the front of its queue at once (and a
message of a job that already ended is dropped). A running job's lease is
renewed by its worker, so a live job is never touched.

This reads kombu's own bookkeeping (``unacked`` and ``unacked_index`` under
the broker's key prefix) and writes it the way kombu's restore does: the job's
state taken back first (``restore``), then its message returned
(``unacked_return``), two scripts since the broker and the state may be two
Redis servers (a duplicate message is dropped by the claim; none is lost). The same
sweep then sends again, from the copy kept at claim, any job still running
whose lease lapsed longer ago than that: its message is gone too.

A lease that lapsed is left to its worker a lease period more once a sweep (or a delivery)
has seen it so (``lapse_seen`` in the job's record), by the give-back and the backstop alike:
after an outage of a job shard (its Redis, or on a Redis Cluster its primary) every lease on
it has lapsed, and the workers still running those jobs take them back meanwhile. The record
holds the note, so a process that takes the role after the outage, having seen none of it,
waits all the same.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import redis

from api_tasks.background import Loop, Turns, each
from api_tasks.connections import UNAVAILABLE
from api_tasks.job_logs import job_context, note_job
from api_tasks.record.keys import Keys
from api_tasks.record.leases import LeaseStore, Requeue
from api_tasks.record.scripts import script

__all__ = ["Reaper"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class Reaper(Loop):
    """A thread that gives back orphaned messages every ``interval`` seconds (``client``: the
    broker's Redis; the jobs' state goes through ``leases``)."""

    def __init__(self, client: redis.Redis, keys: Keys, leases: LeaseStore,
                 interval: float, sweeping: Callable[[], bool] = lambda: True) -> None:
        super().__init__("api-tasks-reaper", interval, log)
        self._redis = client
        self._keys = keys
        self._leases = leases
        self._sweep_every = interval
        self._sweeping = sweeping  # whether this process sweeps for the cluster now
        self._return = client.register_script(script("unacked_return"))
        self._turns = Turns()  # the job shard the next backstop looks at
        self._failed: set[int] = set()  # the shards that failed this sweep: tried no more

    def tick(self) -> None:
        """One sweep, if this process sweeps for the cluster."""
        if self._sweeping():
            self.sweep()

    def sweep(self, limit: int = 500) -> int:
        """One pass; returns how many jobs went back (two at once are safe: each give-back is
        one script)."""
        seconds, micros = self._redis.time()
        self._failed.clear()
        cutoff = seconds + micros / 1e6 - 2 * self._leases.lease_ms / 1000
        tags: list[bytes] = list(self._redis.zrangebyscore(  # type: ignore[arg-type]
            self._keys.unacked_index(), "-inf", cutoff, 0, limit))
        given, unreached = 0, None
        if tags:
            entries: list[Any] = self._redis.hmget(self._keys.unacked(), tags)
            # a job whose shard is out of reach keeps none of the others from their turn
            back, unreached = each([(tag, raw) for tag, raw in zip(tags, entries, strict=True)
                                    if raw is not None], lambda entry: self._give_back(*entry))
            given = sum(back)
        # a running job with no lease for longer than the unacked sweep needs (two lease
        # periods, one more once its lapse is seen, two sweeps) has no message left anywhere
        # (a failed give-back, a lost requeue): send it again
        lapsed = int((cutoff - self._leases.lease_ms / 1000 - 2 * self._sweep_every) * 1000)
        # one job shard a sweep, in turn: the backstop costs the same whatever the shard
        # count (a job it finds waits a few sweeps more; it is rare, and safe to wait)
        recovered, failed = each([self._turns.next(self._keys.every_shard)], lambda shard: (
            self._on_shard(shard, lambda: self._leases.recover(shard, lapsed, limit)) or []))
        for job_id in (job_id for found in recovered for job_id in found):
            with job_context(job_id):  # a JSON line names its job in a field too
                log.warning("reaper: job %s was running with no worker and no message; "
                            "sent again", job_id)
            given += 1
        if (failed := unreached or failed) is not None:  # the others were swept
            raise failed
        return given

    def _on_shard(self, shard: int, act: Callable[[], T]) -> T | None:
        """``act()`` on a job shard, unless it failed earlier in this sweep (None then)."""
        if shard in self._failed:
            return None
        try:
            return act()
        except UNAVAILABLE:
            self._failed.add(shard)
            raise

    def _give_back(self, tag: bytes, raw: bytes) -> bool:
        try:
            payload, _exchange, queue = json.loads(raw)
            job_id = str(payload["headers"]["id"])
        except (ValueError, KeyError, TypeError):
            return False  # not a task message of ours: kombu's own restore will see to it
        outcome = self._on_shard(  # the job's state first, then the message
            self._keys.shard(job_id), lambda: self._leases.restore(job_id))
        if outcome is None or outcome in (Requeue.ALIVE, Requeue.LAPSING):
            return False
        _mark_redelivered(payload)
        prefix = self._keys.celery_prefix()
        self._return(keys=[self._keys.unacked_index(), self._keys.unacked(), prefix + str(queue)],
                     args=[tag, json.dumps(payload) if outcome is Requeue.RESTORED else ""])
        if outcome is Requeue.RESTORED:
            with job_context(job_id):
                note_job(queue=str(queue))
                log.warning("reaper: job %s lost its worker; back on queue %s", job_id, queue)
        return outcome is Requeue.RESTORED


def _mark_redelivered(payload: dict[str, Any]) -> None:
    """Flag the message as redelivered, as kombu does when it restores one."""
    payload.setdefault("headers", {})["redelivered"] = True
    delivery = payload.get("properties", {}).get("delivery_info")
    if isinstance(delivery, dict):
        delivery["redelivered"] = True
