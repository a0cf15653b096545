"""A loopback OpenAI-format server with real servers' quirks, for integration tests and benchmarks.

Usage: ``with FakeUpstream() as up: up.script("m", Reply(chunk_delay=0.1), HttpError(429))``.
"""

from .payloads import DEFAULT_MODEL
from .quota import Quota
from .server import FakeUpstream, Recorded
from .steps import (
    BigBody,
    BigLine,
    Close,
    Drip,
    Endless,
    Hang,
    Html,
    HttpError,
    InvalidUtf8,
    Reply,
    Slow,
    Step,
    StreamError,
)

__all__ = [
    "DEFAULT_MODEL",
    "BigBody",
    "BigLine",
    "Close",
    "Drip",
    "Endless",
    "FakeUpstream",
    "Hang",
    "Html",
    "HttpError",
    "InvalidUtf8",
    "Quota",
    "Recorded",
    "Reply",
    "Slow",
    "Step",
    "StreamError",
]
