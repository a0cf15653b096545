"""Stream events: one JSON envelope for every event of a job, and how entries are read.

Stream entries (``Keys.events``) and pub/sub messages (``Keys.channel``) hold
one field, ``event``, whose value is one of::

    {"type": "chunk", "seq": 0, "attempt": 1, "data": {...the upstream chunk...}}
    {"type": "done", "seq": 12, "attempt": 1, "finish_reason": "stop", "usage": {...}}
    {"type": "error", "seq": 3, "attempt": 1, "error": {...error object...}}
    {"type": "cancelled", "seq": 5, "attempt": 1, "error": {...}}
    {"type": "reset", "seq": 0, "attempt": 2}

Chunks are numbered from 0; the final event's ``seq`` is the number of chunks
before it. Entry ids are ``<attempt>-<seq + 1>``, chosen by us rather than by
Redis, so a write retried after a lost reply is refused as a duplicate instead
of being added twice. A job delivered again (its worker stopped or died) runs a
new attempt, announced by a ``reset`` event (id ``<attempt>-0``): what a reader
showed of earlier attempts is void.

The result key holds the envelope ``{"id", "status", "kind", "response",
"error", "upstream", "model", "attempts", "created_at", "started_at",
"finished_at"}``.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any

from api_tasks.json_codec import loads
from api_tasks.record.job_record import JobStatus

__all__ = [
    "EVENT_FIELD",
    "FINAL_TYPES",
    "EventType",
    "chunk_event",
    "entry_id",
    "final_event",
    "loads",
    "parse_entries",
    "reset_event",
]

EVENT_FIELD = "event"  # the one field of every stream entry


class EventType(StrEnum):
    """The kinds of stream event."""

    CHUNK = "chunk"
    DONE = "done"
    ERROR = "error"
    CANCELLED = "cancelled"
    RESET = "reset"


FINAL_EVENT: dict[JobStatus, EventType] = {
    JobStatus.SUCCEEDED: EventType.DONE,
    JobStatus.FAILED: EventType.ERROR,
    JobStatus.CANCELLED: EventType.CANCELLED,
}


def entry_id(attempt: int, seq: int) -> str:
    """The stream entry id of event ``seq`` of ``attempt``."""
    return f"{attempt}-{seq + 1}"


def chunk_event(seq: int, attempt: int, raw_chunk: str) -> str:
    """A chunk event as JSON; the upstream's chunk text is embedded, not re-encoded."""
    return f'{{"type":"chunk","seq":{seq},"attempt":{attempt},"data":{raw_chunk}}}'


def reset_event(attempt: int) -> str:
    """The event that opens a new attempt; stream id ``<attempt>-0``."""
    return f'{{"type":"reset","seq":0,"attempt":{attempt}}}'


def final_event(status: JobStatus, seq: int, attempt: int, *,
                finish_reason: str | None = None, usage: Any = None,
                error: dict[str, Any] | None = None) -> str:
    """The last event of a job as JSON."""
    event: dict[str, Any] = {"type": FINAL_EVENT[status].value, "seq": seq, "attempt": attempt}
    if status is JobStatus.SUCCEEDED:
        event["finish_reason"] = finish_reason
        event["usage"] = usage
    else:
        event["error"] = error
    return json.dumps(event, separators=(",", ":"))


FINAL_TYPES = frozenset(FINAL_EVENT.values())  # the event types that end a stream
_FIELD = EVENT_FIELD.encode()


def parse_entries(entries: Any) -> list[dict[str, Any]]:
    """Stream entries (``XRANGE``/``XREVRANGE``, or one stream of an ``XREAD`` reply) as
    event envelopes, each with its entry ``id``."""
    events = []
    for entry_id, fields in entries or ():
        event = loads(fields[_FIELD])
        event["id"] = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        events.append(event)
    return events
