"""Relay one upstream event stream: parse, publish in order, assemble the result.

Its bytes come through ``HttpClient.reads``, secrets already replaced. Each
network read becomes one batch of writes (one pipeline through the
``EventWriter``), so chunks that arrive together are written together. A
batch is handed over even when a later event in it fails, so every chunk
counted as published really is in Redis before the error event.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from api_tasks.errors import InvalidResponseError, StreamError, UpstreamError
from api_tasks.json_codec import loads
from api_tasks.record.events import EVENT_FIELD, chunk_event, entry_id
from api_tasks.record.exchange import Command
from api_tasks.record.keys import Keys
from api_tasks.record.writer import EventWriter
from api_tasks.stream.assemble import Assembler, assembler_for
from api_tasks.stream.sse import SSEDecoder, SSEEvent
from api_tasks.upstream.redact import scrub

__all__ = ["StreamRelay"]

_RENEW_EVERY = 1.0  # seconds between two renewals of a stream's TTL while it is written


@dataclass
class StreamRelay:
    """Publishes one attempt's chunks and folds them into the final response."""

    job_id: str
    attempt: int
    kind: str
    keys: Keys
    writer: EventWriter
    ttl: int
    max_line_bytes: int
    max_events: int = 100_000  # jobs.max_stream_events
    max_bytes: int = 32 * 1024 * 1024  # jobs.max_stream_bytes
    secrets: tuple[str, ...] = ()  # scrubbed again from a decoded error event's fields
    published: int = 0
    first_at: float | None = None  # when the first chunk was handed to the writer (epoch s)
    stored: int = 0  # bytes of events this attempt wrote to the stream
    done: bool = False
    _renew_at: float = 0.0  # when the stream's TTL is set again (monotonic seconds)
    assembler: Assembler = field(init=False)
    decoder: SSEDecoder = field(init=False)

    def __post_init__(self) -> None:
        self.assembler = assembler_for(self.kind)
        self.decoder = SSEDecoder(self.max_line_bytes)

    def feed(self, data: bytes) -> bool:
        """Relay the events completed by ``data``; True once the last event was seen
        (``[DONE]``, or a responses stream's closing event)."""
        return self._relay(self.decoder.feed(data))

    def close(self) -> bool:
        """End of body: relay a last event that lacked its blank line."""
        return self._relay(self.decoder.close())

    def complete(self) -> bool:
        """Whether the stream ended properly ([DONE], every choice finished, or the
        response came)."""
        return self.assembler.finished or (self.done and not self.assembler.closes)

    def response(self) -> dict[str, Any]:
        """The assembled response, in the non-streamed shape."""
        return self.assembler.response()

    def _relay(self, events: Iterable[SSEEvent]) -> bool:
        commands: list[Command] = []
        stored = self.stored
        try:
            for event in events:
                if event.data == "[DONE]":
                    self.done = True
                    break
                chunk = self._parse(event)
                self.assembler.add(chunk)
                commands += self._chunk_commands(event.data)
                if chunk.get("type") == "response.failed":  # published, then the job fails
                    failed = chunk.get("response")
                    error = failed.get("error") if isinstance(failed, dict) else None
                    raise self._stream_error({"error": error or {
                        "message": "the upstream reported that the response failed"}})
                if self.assembler.last:
                    self.done = True
                    break
        finally:
            if commands:
                now = time.monotonic()
                if now >= self._renew_at:
                    # set with the first chunks, then at most once a second: a stream that
                    # pauses for less than its TTL keeps its start, and an EXPIRE per read
                    # would cost a third of the writes
                    self._renew_at = now + min(self.ttl / 2, _RENEW_EVERY)
                    commands.append(("EXPIRE", self.keys.events(self.job_id), self.ttl))
                self.writer.submit(commands, size=2 * (self.stored - stored))
                if stored == 0:
                    # first chunks: let the writer run now rather than when this thread next
                    # blocks (the GIL), since a reader is waiting for them
                    time.sleep(0)
        return self.done

    def _chunk_commands(self, raw: str) -> list[Command]:
        payload = chunk_event(self.published, self.attempt, raw)
        if self.published >= self.max_events or self.stored + len(payload) > self.max_bytes:
            raise StreamError(
                f"the stream passed what one job may keep in Redis ({self.published} events, "
                f"{self.stored} bytes; jobs.max_stream_events {self.max_events}, "
                f"jobs.max_stream_bytes {self.max_bytes})", code="stream_too_large")
        self.stored += len(payload)
        stream = self.keys.events(self.job_id)
        self.published += 1
        if self.first_at is None:
            self.first_at = time.time()
        return [("XADD", stream, entry_id(self.attempt, self.published - 1), EVENT_FIELD,
                 payload), ("PUBLISH", self.keys.channel(self.job_id), payload)]

    def _parse(self, event: SSEEvent) -> dict[str, Any]:
        try:
            chunk = loads(event.data)
        except ValueError as err:
            raise InvalidResponseError(
                f"upstream sent an event that is not JSON: {event.data[:120]!r}",
                code="invalid_json") from err
        if event.event == "error" or (isinstance(chunk, dict) and (
                chunk.get("error") or chunk.get("type") == "error")):
            raise self._stream_error(chunk)
        if not isinstance(chunk, dict) or not isinstance(chunk.get("choices", []), list):
            raise InvalidResponseError("upstream sent a chunk that is not an OpenAI chunk "
                                       "object", code="invalid_chunk")
        return chunk

    def _stream_error(self, chunk: Any) -> UpstreamError:
        error = chunk.get("error", chunk) if isinstance(chunk, dict) else chunk
        if not isinstance(error, dict):
            error = {"message": str(error)}
        code, kind = error.get("code"), error.get("type")
        if kind == "error":  # a responses stream's error event names no class
            kind = None
        message = str(error.get("message") or "upstream reported an error in the stream")
        return StreamError(scrub(message, self.secrets)[:2000],
                           code=scrub(str(code), self.secrets) if code not in (None, "")
                           else "stream_error",
                           type=scrub(str(kind), self.secrets) if kind else "server_error",
                           status=200)
