"""An incremental server-sent events decoder (pure: bytes in, events out).

Follows the WHATWG event-stream rules real servers rely on: lines end in
LF, CRLF or CR (a CRLF may be split across reads); ``data:`` lines of one
event are joined with ``\\n``; ``event:`` and ``id:`` are kept; comment lines
(``:keep-alive``) and ``retry:`` are ignored; a blank line ends an event.
Lines are split on bytes before decoding, so a UTF-8 character cut across two
network reads is decoded whole; invalid UTF-8 becomes U+FFFD rather than
failing a whole generation. A line longer than ``max_line_bytes`` raises.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from api_tasks.errors import InvalidResponseError

__all__ = ["SSEDecoder", "SSEEvent"]


@dataclass(frozen=True)
class SSEEvent:
    """One dispatched event."""

    data: str
    event: str = "message"
    id: str | None = None


@dataclass
class SSEDecoder:
    """Feed it bytes as they arrive; it returns the events they complete."""

    max_line_bytes: int = 4 * 1024 * 1024
    _buffer: bytearray = field(default_factory=bytearray)
    _skip_lf: bool = False
    _fresh: bool = True
    _data: list[str] = field(default_factory=list)
    _event: str = ""
    _id: str | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Consume bytes; return the events completed by them, in order."""
        if self._skip_lf and chunk[:1] == b"\n":
            chunk = chunk[1:]
        self._skip_lf = False
        if self._fresh:
            self._fresh = False
            chunk = chunk.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM may open the stream
        self._buffer += chunk
        if b"\n" not in chunk and b"\r" not in chunk:
            # no line ends here: don't rescan a long partial line on every read
            self._check_size()
            return []
        events: list[SSEEvent] = []
        for line in self._take_lines():
            event = self._line(line)
            if event is not None:
                events.append(event)
        self._check_size()
        return events

    def _check_size(self) -> None:
        if len(self._buffer) > self.max_line_bytes:
            raise InvalidResponseError(
                f"upstream sent an event-stream line longer than {self.max_line_bytes} bytes",
                code="line_too_long",
            )

    def close(self) -> list[SSEEvent]:
        """End of stream: flush a final event that lacked its blank line."""
        events: list[SSEEvent] = []
        if self._buffer:
            line = bytes(self._buffer)
            self._buffer.clear()
            event = self._line(line)
            if event is not None:
                events.append(event)
        event = self._dispatch()
        return events + ([event] if event is not None else [])

    def _take_lines(self) -> list[bytes]:
        text = self._buffer
        if b"\r" not in text:
            *lines, rest = text.split(b"\n")
        else:
            *lines, rest = text.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
            if text.endswith(b"\r"):
                # the LF of a CRLF may arrive in the next read: don't count it twice
                self._skip_lf = True
        self._buffer = bytearray(rest)
        return [bytes(line) for line in lines]

    def _line(self, raw: bytes) -> SSEEvent | None:
        if not raw:
            return self._dispatch()
        line = raw.decode("utf-8", errors="replace")
        name, _, value = line.partition(":")
        if not name:
            return None  # a comment such as ": keep-alive"
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        return None

    def _dispatch(self) -> SSEEvent | None:
        if not self._data:
            self._event = ""
            return None
        event = SSEEvent("\n".join(self._data), self._event or "message", self._id)
        self._data, self._event = [], ""
        return event
