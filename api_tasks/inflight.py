"""Jobs in flight in this process, and the watchdog that keeps and stops them.

A worker thread blocked in ``recv`` cannot check anything, and Celery's
``revoke(terminate=True)`` does nothing on the threads pool. So every job
registers a ``CallHandle`` from its claim to its finish; one watchdog thread
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
import socket
import threading
import time
from collections.abc import Iterator
from enum import StrEnum
from typing import Any

import redis

from api_tasks.background import Loop
from api_tasks.errors import APITimeoutError, CallCancelled, UpstreamError
from api_tasks.keys import Keys
from api_tasks.leases import LeaseStore

__all__ = ["CallHandle", "Stop", "Watchdog", "current_handle"]

log = logging.getLogger(__name__)
_local = threading.local()


class Stop(StrEnum):
    """Why a call was stopped."""

    CANCELLED = "cancelled"  # its job was cancelled
    DEADLINE = "deadline"  # it passed its whole-call deadline
    SHUTDOWN = "shutdown"  # the worker is stopping: the job goes back to its queue
    LOST = "lost"  # another attempt took the job over


class CallHandle:
    """One job's call: its deadline, its open connection, and why it was stopped."""

    def __init__(self, job_id: str, token: str = "") -> None:
        self.job_id = job_id
        self.token = token
        self.flights: list[str] = []  # in-flight sets the call holds a slot in
        self.deadline = float("inf")
        self.total = 0.0
        self.reason: Stop | None = None
        self.stopped = threading.Event()
        self._sock: Any = None
        self._lock = threading.Lock()

    def start_attempt(self, total: float) -> None:
        """Arm the whole-call deadline for the next attempt."""
        with self._lock:
            self._sock = None
            self.total = total
            self.deadline = time.monotonic() + total

    def pause(self) -> None:
        """Between attempts: no deadline, and a past deadline is forgiven."""
        with self._lock:
            self.deadline = float("inf")
            if self.reason is Stop.DEADLINE:
                self.reason = None
                self.stopped.clear()

    def attach(self, sock: Any) -> None:
        """Remember the socket the call uses (called by the adapter's connections).

        The socket itself is kept, not the connection: http.client drops
        ``conn.sock`` for a response that ends at close, while its socket lives on.
        """
        if sock is None:
            return
        with self._lock:
            self._sock = sock
            if self.reason is not None:
                _shutdown(sock)

    def abort(self, reason: Stop) -> None:
        """Stop the call: record why, wake any wait, close the socket."""
        with self._lock:
            if self.reason is None:
                self.reason = reason
            self.stopped.set()
            _shutdown(self._sock)

    def error(self) -> UpstreamError | None:
        """The error that explains an abort, if the call was aborted."""
        if self.reason is Stop.CANCELLED:
            return CallCancelled("the job was cancelled")
        if self.reason is Stop.DEADLINE:
            return APITimeoutError(
                f"the call exceeded its total deadline of {self.total:g}s",
                code="deadline_exceeded",
            )
        if self.reason is Stop.SHUTDOWN:
            return APITimeoutError("the worker is shutting down", code="worker_shutdown")
        if self.reason is Stop.LOST:
            return APITimeoutError("another attempt took this job over", code="lease_lost")
        return None

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True if the call was aborted meanwhile."""
        return self.stopped.wait(seconds)

    @contextlib.contextmanager
    def bound(self) -> Iterator[CallHandle]:
        """Make this the handle that connections opened in this thread attach to."""
        previous = getattr(_local, "handle", None)
        _local.handle = self
        try:
            yield self
        finally:
            _local.handle = previous


def current_handle() -> CallHandle | None:
    """The handle bound in this thread, if any."""
    return getattr(_local, "handle", None)


def _shutdown(sock: Any) -> None:
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class Watchdog(Loop):
    """One thread per process enforcing deadlines and cancel flags on all handles."""

    def __init__(self, client: redis.Redis, keys: Keys, interval: float,
                 leases: LeaseStore) -> None:
        super().__init__("api-tasks-watchdog", interval, log)
        self._redis = client
        self._keys = keys
        self._leases = leases
        self._renew_every = leases.lease_ms / 3000.0
        self._renewed = 0.0
        self._handles: dict[int, CallHandle] = {}
        self._lock = threading.Lock()

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
        if handles:
            self._check_cancel(handles)
        if now - self._renewed >= self._renew_every:
            self._renew(handles)
            self._renewed = now

    def _renew(self, handles: list[CallHandle]) -> None:
        held = [(h.job_id, h.token, h.flights) for h in handles if h.token]
        lost = set(self._leases.renew(self._redis, held)) if held else set()
        for handle in handles:
            if handle.job_id in lost:
                log.warning("job %s: another attempt took it over; stopping this one",
                            handle.job_id)
                handle.abort(Stop.LOST)

    def _check_cancel(self, handles: list[CallHandle]) -> None:
        flags = self._redis.mget([self._keys.cancel(h.job_id) for h in handles])
        for handle, flag in zip(handles, flags, strict=True):
            if flag is not None:
                handle.abort(Stop.CANCELLED)
