"""One call in flight: its deadline, its socket, and why it was stopped.

A worker thread blocked in ``recv`` cannot check anything, so each job's call
is a ``CallHandle`` that other threads stop: the watchdog (``api_tasks.execution.watchdog``)
on a deadline, a cancel or a lost lease; the runtime at shutdown. Stopping
shuts the call's socket down, which wakes the blocked read at once. The HTTP
client attaches each connection's socket to the handle bound in its thread.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from enum import StrEnum
from typing import Any

from api_tasks.errors import APITimeoutError, CallCancelled, UpstreamError

__all__ = ["CallHandle", "Stop", "current_handle"]

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

    def detach(self, sock: Any) -> None:
        """Forget ``sock``: its connection went back to the pool, for another call."""
        with self._lock:
            if self._sock is sock:
                self._sock = None

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
