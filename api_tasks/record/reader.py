"""``Job``: a handle on a submitted job, usable from any process.

``get_job`` checks that a job exists; a ``Job`` itself waits for its events
even before a worker has seen it (a job sent by a plain Celery client has no
record until a worker claims it).

Waiting reads the job's event stream with ``XREAD BLOCK``: nothing polls, a
reader that comes late still sees every event from the first, and the final
event (done, error or cancelled) tells it where to stop.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from typing import Any, ParamSpec, Protocol, TypeVar

from redis import Redis

from api_tasks.connections import BLOCK_SLICE, broker_errors
from api_tasks.errors import (
    ApiTasksError,
    JobCancelled,
    JobFailed,
    JobNotFound,
    JobTimeout,
    StreamRestarted,
)
from api_tasks.record.events import EVENT_FIELD, TERMINAL, EventType, JobStatus
from api_tasks.record.keys import Keys
from api_tasks.record.store import JobStore, job_view

__all__ = ["Job", "Reader", "text_of"]

P = ParamSpec("P")
T = TypeVar("T")
_FIELD = EVENT_FIELD.encode()
_MAX_SEQ = 2**64 - 1


class _Ended(ApiTasksError):
    """Internal: the job's record says it ended, but no final event can be read."""



_FINAL = {EventType.DONE.value, EventType.ERROR.value, EventType.CANCELLED.value}
# which attempt holds or ended it: the workers' business, not the caller's
_ATTEMPT_FIELDS = frozenset({"token", "ended_by"})


class Reader(Protocol):
    """What a ``Job`` reads and writes through (a ``Client`` is one)."""

    store: JobStore
    redis: Redis
    blocking: Redis  # for XREAD BLOCK, with its longer timeout
    keys: Keys


class Job:
    """A submitted job, identified by ``id``."""

    def __init__(self, client: Reader, job_id: str) -> None:
        self.id = job_id
        self._client = client

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def status(self) -> JobStatus:
        """The job's current status."""
        value = _guard(self._client.store.status, self.id)
        if value is None:
            raise JobNotFound(f"no job {self.id!r} (never submitted, or expired)")
        return JobStatus(value)

    def info(self) -> dict[str, Any]:
        """The job's record: status, kind, upstream, model, timestamps, attempts."""
        return {name: value for name, value in self._record().items()
                if name not in _ATTEMPT_FIELDS}

    def describe(self) -> dict[str, Any]:
        """The job's state as typed JSON: status, attempt, calls, timestamps, error..."""
        return job_view(self.id, self._record())

    def _record(self) -> dict[str, str]:
        info = _guard(self._client.store.info, self.id)
        if not info:
            raise JobNotFound(f"no job {self.id!r} (never submitted, or expired)")
        return info

    def result(self, timeout: float | None = None) -> dict[str, Any] | None:
        """Wait for the end; return the OpenAI-format response (None if not stored).

        Raises ``JobFailed`` (``.error`` is the error object), ``JobCancelled``,
        or ``JobTimeout`` when ``timeout`` seconds pass first.
        """
        with contextlib.suppress(_Ended):  # then the stored result tells how it ended
            self._raise_for(self._final_event(timeout))
        return self._stored_outcome()

    def stream(self, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Yield the upstream's chunks in order from the first, then stop at the end.

        Works wherever the job is: queued, running or finished; a finished job
        that ran twice shows its last attempt only. Raises like ``result()`` when
        the job fails, is cancelled or ``timeout`` passes, and ``StreamRestarted``
        if a new attempt begins after this reader showed chunks of an earlier one.
        """
        shown: int | None = None
        try:
            for event in self.events(timeout=timeout, after=self._latest_attempt_start()):
                kind = event["type"]
                if kind == EventType.CHUNK.value:
                    shown = event["attempt"]
                    yield event["data"]
                elif kind == EventType.RESET.value:
                    if shown is not None and shown < event["attempt"]:
                        raise StreamRestarted(self.id, event["attempt"])
                else:
                    self._raise_for(event)
        except _Ended:
            self._stored_outcome()

    def text_stream(self, timeout: float | None = None) -> Iterator[str]:
        """Yield the generated text as it arrives: the first choice's content, nothing else.

        Usage chunks (``choices: []``) and role-only deltas are skipped; a job submitted
        without ``stream=True`` yields its whole text once it is done. Raises like ``stream()``.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        streamed = False
        for chunk in self.stream(timeout):
            streamed = True
            for choice in chunk.get("choices") or ():
                if isinstance(choice, dict) and choice.get("index", 0) == 0:
                    piece = (choice.get("delta") or {}).get("content") or choice.get("text")
                    if isinstance(piece, str) and piece:
                        yield piece
        if not streamed:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            text = text_of(self.result(left))
            if text:
                yield text

    def events(self, timeout: float | None = None, after: str = "0-0") -> Iterator[dict[str, Any]]:
        """Yield every event envelope after stream id ``after``, up to the final one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        key = self._client.keys.events(self.id)
        last = after
        while True:
            entries = self._read(key, last, deadline)
            for entry_id, fields in entries:
                last = entry_id
                event = json.loads(fields[_FIELD])
                event["id"] = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                yield event
                if event["type"] in _FINAL:
                    return

    def cancel(self) -> bool:
        """Ask the job to stop; False if it had already ended."""
        verdict = _guard(self._client.store.cancel, self.id)
        if verdict == "missing":
            raise JobNotFound(f"no job {self.id!r} (never submitted, or expired)")
        return verdict in ("cancelled", "cancelling")

    def _final_event(self, timeout: float | None) -> dict[str, Any]:
        # start from the newest entry: a long stream's chunks need not be read again
        tail: Any = _guard(self._client.redis.xrevrange, self._client.keys.events(self.id),
                           count=1)
        after = "0-0"
        if tail:
            entry_id, fields = tail[0]
            event = json.loads(fields[_FIELD])
            if event["type"] in _FINAL:
                return {**event}
            after = entry_id.decode()
        for event in self.events(timeout, after=after):
            if event["type"] in _FINAL:
                return event
        raise JobTimeout(f"job {self.id} did not finish")  # unreachable: events() ends on final

    def _read(self, key: str, last: str, deadline: float | None) -> list[Any]:
        while True:
            left = BLOCK_SLICE if deadline is None else deadline - time.monotonic()
            wait = min(BLOCK_SLICE, left)
            if wait <= 0:
                raise JobTimeout(f"job {self.id} did not finish in time")
            reply: Any = _guard(self._client.blocking.xread, {key: last}, count=500,
                                block=max(int(wait * 1000), 1))
            if reply:  # RESP2 shape: [[key, [(id, fields), ...]]]
                return list(reply[0][1])
            if _guard(self._client.store.status, self.id) in TERMINAL:
                raise _Ended  # ended, but its final event is gone (expired or never written)

    def _latest_attempt_start(self) -> str:
        """The stream id just before the newest attempt's first entry."""
        tail: Any = _guard(self._client.redis.xrevrange, self._client.keys.events(self.id),
                           count=1)
        attempt = int(tail[0][0].split(b"-")[0]) if tail else 0
        return f"{attempt - 1}-{_MAX_SEQ}" if attempt > 0 else "0-0"

    def _stored_outcome(self) -> dict[str, Any] | None:
        """The response from the result key, or the error as an exception."""
        stored: dict[str, Any] | None = _guard(self._client.store.result, self.id)
        if stored is None or stored.get("status") == JobStatus.SUCCEEDED.value:
            return None if stored is None else stored.get("response")
        error = stored.get("error") or {}
        if stored.get("status") == JobStatus.CANCELLED.value:
            raise JobCancelled(self.id, error)
        raise JobFailed(self.id, error)

    def _raise_for(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind == EventType.ERROR.value:
            raise JobFailed(self.id, event.get("error") or {})
        if kind == EventType.CANCELLED.value:
            raise JobCancelled(self.id, event.get("error") or {"code": "cancelled"})


def text_of(response: dict[str, Any] | None) -> str:
    """The first choice's text of an OpenAI response (chat or completion), "" if none."""
    choices = (response or {}).get("choices") or [{}]
    first = choices[0] if isinstance(choices[0], dict) else {}
    if isinstance(first.get("message"), dict):
        return str(first["message"].get("content") or "")
    return str(first.get("text") or "")


def _guard(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Call Redis; a connection failure becomes ``BrokerUnavailable`` with the reason."""
    with broker_errors():
        return fn(*args, **kwargs)
