"""What one worker process has done lately, for its liveness record (``top`` reads it)."""

from __future__ import annotations

import collections
import threading
from typing import Any

from api_tasks.record.job_record import JobStatus

__all__ = ["Tally"]

_RECENT = 5  # failures a worker's record keeps


class Tally:
    """Jobs this process ended, by status, and its latest failures (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ended: collections.Counter[str] = collections.Counter()
        self._failures: collections.deque[dict[str, Any]] = collections.deque(maxlen=_RECENT)

    def ended(self, job_id: str, status: JobStatus, at: float, upstream: str,
              error: dict[str, Any] | None) -> None:
        """A job ended here."""
        with self._lock:
            self._ended[status.value] += 1
            if status is JobStatus.FAILED and error is not None:
                self._failures.append({"job_id": job_id, "at": round(at, 3),
                                       "upstream": upstream, "code": error.get("code"),
                                       "status": error.get("status")})

    def snapshot(self, running: int) -> dict[str, Any]:
        """What the liveness record says of this process's work."""
        with self._lock:
            return {"running": running, "ended": dict(self._ended),
                    "failures": list(self._failures)}
