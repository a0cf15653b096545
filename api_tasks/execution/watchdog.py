"""Jobs in flight in this process, and the watchdog that keeps and stops them.

A worker thread blocked in ``recv`` cannot check anything, and Celery's
``revoke(terminate=True)`` does nothing on the threads pool. So every job
registers a ``CallHandle`` (``api_tasks.upstream.call_handle``) from its claim to its
finish; one watchdog thread
per process checks, a few times a second, every handle's deadline and (in
one Redis round trip for all of them) its job's cancel flag, and aborts a
call by shutting its socket down, which wakes the blocked read at once and
frees the server's slot. Every third of a lease period it also renews the
leases of all its jobs, in one pipeline, on a connection of its own with a
short timeout (so a stuck read elsewhere can't let its leases lapse).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator

import redis

from api_tasks.background import Loop
from api_tasks.record.calls import Failed, SyncShell, command
from api_tasks.record.keys import Keys
from api_tasks.record.leases import LeaseStore
from api_tasks.upstream.call_handle import CallHandle, Stop

__all__ = ["Watchdog"]

log = logging.getLogger(__name__)


class Watchdog(Loop):
    """One thread per process enforcing deadlines and cancel flags on all handles."""

    def __init__(self, client: redis.Redis, keys: Keys, interval: float,
                 leases: LeaseStore) -> None:
        super().__init__("api-tasks-watchdog", interval, log)
        self._shell = SyncShell(client)  # a cluster's nodes each on their own
        self._keys = keys
        self._leases = leases
        self._renew_every = leases.lease_ms / 3000.0
        self._renewed = 0.0
        self._handles: dict[int, CallHandle] = {}
        self._lock = threading.Lock()

    def count(self) -> int:
        """How many jobs this process is running now."""
        return len(self._handles)

    @contextlib.contextmanager
    def watching(self, handle: CallHandle) -> Iterator[CallHandle]:
        """Watch ``handle`` for the duration of the block."""
        with self._lock:
            self._handles[id(handle)] = handle
        try:
            yield handle
        finally:
            with self._lock:
                self._handles.pop(id(handle), None)

    def abort_all(self, reason: Stop) -> int:
        """Abort every call in flight (used at shutdown); returns how many."""
        handles = self._snapshot()
        for handle in handles:
            handle.abort(reason)
        return len(handles)

    def _snapshot(self) -> list[CallHandle]:
        with self._lock:
            return list(self._handles.values())

    def tick(self) -> None:
        """Enforce deadlines (no Redis needed), then cancel flags, then lease renewals."""
        handles = self._snapshot()
        now = time.monotonic()
        for handle in handles:
            if now > handle.deadline:
                handle.abort(Stop.DEADLINE)
        try:
            if handles:
                self._check_cancel(handles)
        finally:  # a cancel check that failed must not keep the leases from their renewal
            if now - self._renewed >= self._renew_every:
                self._renew(handles)
                self._renewed = now

    def _renew(self, handles: list[CallHandle]) -> None:
        held = [(h.job_id, h.token, h.flights) for h in handles if h.token]
        # by attempt, not by job: a job given back and delivered again to this same process
        # has two attempts here, the old one lost and the new one holding it
        lost = set(self._leases.renew(self._shell, held)) if held else set()
        for handle in handles:
            if (handle.job_id, handle.token) in lost:
                log.warning("job %s: another attempt took it over; stopping this one",
                            handle.job_id)
                handle.abort(Stop.LOST)

    def _check_cancel(self, handles: list[CallHandle]) -> None:
        # one MGET a shard: on a Redis Cluster a shard's keys share a slot, others' may not
        by_shard: dict[int, list[CallHandle]] = {}
        for handle in handles:
            by_shard.setdefault(self._keys.shard(handle.job_id), []).append(handle)
        replies = self._shell.run_groups([[command("MGET", *(
            self._keys.cancel(h.job_id) for h in group))] for group in by_shard.values()])
        for group, reply in zip(by_shard.values(), replies, strict=True):
            if isinstance(reply, Failed):  # its node is out of reach: looked at next tick
                continue
            for handle, flag in zip(group, reply[0], strict=True):
                if flag is not None:
                    handle.abort(Stop.CANCELLED)
