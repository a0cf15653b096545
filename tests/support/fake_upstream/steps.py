"""Scripted behaviours: each request to a scripted model consumes one of these steps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Reply:
    """A successful completion, optionally streamed with the quirks of real servers."""

    content: str | None = None  # None echoes the request
    pieces: Sequence[str] | None = None  # exact streamed deltas; content = "".join(pieces)
    finish_reason: str | None = "stop"  # None omits the finish chunk when streaming
    usage: bool = True
    delay: float = 0.0  # before the status line
    first_chunk_delay: float = 0.0  # after the headers, before the first event
    chunk_delay: float = 0.0  # between events
    end_delay: float = 0.0  # after the last event, before the body's end (the last chunk)
    keepalive: bool = False  # ": keep-alive" comments like llama.cpp / OpenRouter
    event_lines: bool = False  # "event: message" before each data line, like some proxies
    crlf: bool = False
    multiline_data: bool = False  # one JSON event spread over several data: lines
    split_writes: bool = False  # events cut inside UTF-8 characters and CRLF pairs
    done: bool = True  # False omits "data: [DONE]"
    truncate_after: int | None = None  # close abruptly after this many content chunks
    chunked: bool = True  # False: Connection: close, body ends at EOF
    headers: Mapping[str, str] = field(default_factory=dict)
    tool_calls: bool = False
    n: int = 1
    gzip: bool = False  # compress a JSON body, as nginx or Cloudflare in front of a server do


def Slow(delay: float) -> Reply:  # capitalised to read like the other steps
    """A default reply sent after `delay` seconds."""
    return Reply(delay=delay)


@dataclass(frozen=True)
class HttpError:
    """An error status with an OpenAI-style error body unless `body` is given."""

    status: int
    error: Mapping[str, Any] | None = None  # the inner error object (or a full {"error": ...})
    body: bytes | None = None  # sent verbatim, wins over `error`
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)  # e.g. Retry-After
    delay: float = 0.0


@dataclass(frozen=True)
class Html:
    """An nginx-style HTML error page, as a misconfigured proxy returns."""

    status: int = 502
    title: str = "502 Bad Gateway"


@dataclass(frozen=True)
class StreamError:
    """A 200 event stream that sends `after` content chunks, then an error event."""

    after: int = 2
    error: Mapping[str, Any] | None = None  # the inner error object (or a full {"error": ...})
    event_line: bool = False  # precede the error data with "event: error"


@dataclass(frozen=True)
class Hang:
    """Read the request, then say nothing until the client leaves or time runs out."""

    max_seconds: float = 60.0


@dataclass(frozen=True)
class Drip:
    """Send one byte every `interval` so read timeouts never fire."""

    interval: float = 1.0
    total: float = 60.0
    status_first: bool = True  # False drips the status line and headers too


@dataclass(frozen=True)
class Close:
    """Read the request, then close the connection without any response."""


@dataclass(frozen=True)
class BigBody:
    """A 200 JSON completion of exactly `size` bytes (padded content), sent chunked."""

    size: int


@dataclass(frozen=True)
class BigLine:
    """A 200 event stream whose first data: line is `size` bytes and never ends."""

    size: int


@dataclass(frozen=True)
class Endless:
    """A 200 event stream of content chunks, as fast as the client reads, that never
    finishes (a runaway upstream): it stops only when the client leaves or time is up."""

    piece: str = "token "
    max_seconds: float = 120.0


@dataclass(frozen=True)
class InvalidUtf8:
    """A reply whose content bytes include \\xff\\xfe inside the JSON string."""


Step = (
    Reply | HttpError | Html | StreamError | Hang | Drip | Close | BigBody | BigLine | Endless
    | InvalidUtf8
)
