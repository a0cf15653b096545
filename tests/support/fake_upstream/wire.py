"""Byte-level response writing: HTTP framing, SSE encoding, and noticing a departed client."""

from __future__ import annotations

import contextlib
import json
import math
import select
import socket
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from itertools import pairwise
from typing import Any

_FLUSH_AT = 64 * 1024  # keeps memory flat for big bodies without a syscall per tiny write
_SPLIT_GAP = 0.002  # long enough for the client to see separate reads, short enough for tests


class ClientGone(Exception):
    """The client closed its connection before the response was complete."""


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON, as OpenAI and vLLM put it on the wire."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def _reason(status: int) -> str:
    """The standard reason phrase, or a neutral one for unusual codes."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Status"


class Wire:
    """Buffered writer for one response; turns a closed peer into ClientGone."""

    def __init__(self, sock: socket.socket) -> None:
        """Wraps the accepted socket; nothing is sent until flush()."""
        self.sock = sock
        self.chunked = False
        self.must_close = False  # the handler closes the connection after this response
        self.extra: list[tuple[str, str]] = []  # sent with every head (x-ratelimit-*)
        self._buf: list[bytes] = []
        self._size = 0

    def head_bytes(
        self, status: int, headers: Iterable[tuple[str, str]], chunked: bool, close: bool
    ) -> bytes:
        """Builds the status line and headers and adopts their framing."""
        self.chunked, self.must_close = chunked, self.must_close or close
        lines = [f"HTTP/1.1 {status} {_reason(status)}", "Server: fake-upstream"]
        lines += [f"{k}: {v}" for k, v in [*headers, *self.extra]]
        if chunked:
            lines.append("Transfer-Encoding: chunked")
        if close:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def head(
        self, status: int, headers: Iterable[tuple[str, str]], chunked: bool, close: bool = False
    ) -> None:
        """Queues the status line and headers."""
        self.raw(self.head_bytes(status, headers, chunked, close))

    def respond(
        self, status: int, ctype: str, body: bytes, extra: Mapping[str, str] | None = None
    ) -> None:
        """Sends a complete Content-Length response in one write."""
        headers = [("Content-Type", ctype), ("Content-Length", str(len(body)))]
        self.head(status, [*headers, *(extra or {}).items()], chunked=False)
        self.raw(body)
        self.flush()

    def raw(self, data: bytes) -> None:
        """Queues bytes without any framing."""
        self._buf.append(data)
        self._size += len(data)
        if self._size >= _FLUSH_AT:
            self.flush()

    def write(self, data: bytes) -> None:
        """Queues body bytes, as their own HTTP chunk when chunked."""
        if data and self.chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        if data:
            self.raw(data)

    def flush(self) -> None:
        """Sends everything queued."""
        if not self._buf:
            return
        data = b"".join(self._buf)
        self._buf, self._size = [], 0
        try:
            self.sock.sendall(data)
        except OSError as exc:  # EPIPE / ECONNRESET: the client hung up mid-response
            raise ClientGone from exc

    def end(self) -> None:
        """Finishes the body properly (terminating chunk, or EOF when unframed)."""
        if self.chunked:
            self.raw(b"0\r\n\r\n")
        self.flush()
        if not self.chunked:
            self.abort()

    def abort(self) -> None:
        """Sends what is queued, then closes without finishing the response."""
        self.flush()
        self.must_close = True
        with contextlib.suppress(OSError):  # already gone: nothing left to close politely
            self.sock.shutdown(socket.SHUT_RDWR)

    def pause(self, seconds: float) -> None:
        """Waits, flushing first; raises ClientGone as soon as the client closes."""
        if seconds <= 0:
            return
        self.flush()
        deadline = time.monotonic() + seconds
        poller = select.poll()  # poll, not select: no FD_SETSIZE limit under load
        poller.register(self.sock, select.POLLIN)
        while (left := deadline - time.monotonic()) > 0:
            if not poller.poll(math.ceil(left * 1000)):
                continue
            if self.peer_closed():
                raise ClientGone
            time.sleep(max(0.0, deadline - time.monotonic()))  # pipelined bytes: poll would spin

    def peer_closed(self) -> bool:
        """True when the client has sent EOF or reset the connection."""
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def dribble(self, data: bytes) -> None:
        """Writes `data` in small pieces cut inside UTF-8 characters and CRLF pairs."""
        for piece in split_bytes(data):
            self.write(piece)
            self.pause(_SPLIT_GAP)


def split_bytes(data: bytes) -> Iterator[bytes]:
    """Cuts after each UTF-8 lead byte, between CR and LF, and a few fixed places."""
    cuts = {min(3, len(data)), len(data) // 2}
    for i in range(1, len(data)):
        prev, cur = data[i - 1], data[i]
        if (prev >= 0xC0 and 0x80 <= cur <= 0xBF) or (prev == 0x0D and cur == 0x0A):
            cuts.add(i)
    start = 0
    for cut in sorted(c for c in cuts if 0 < c < len(data)):
        yield data[start:cut]
        start = cut
    yield data[start:]


def structural_commas(text: str) -> list[int]:
    """Offsets just after commas outside JSON strings, where a newline is plain whitespace."""
    out: list[int] = []
    in_str = escaped = False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif in_str and ch == "\\":
            escaped = True
        elif ch == '"':
            in_str = not in_str
        elif ch == "," and not in_str:
            out.append(i + 1)
    return out


@dataclass(frozen=True)
class SseFormat:
    """How events are spelled: line endings, event: lines, multi-line data."""

    eol: bytes = b"\n"
    event_lines: bool = False
    multiline: bool = False

    def event(self, payload: bytes, name: bytes = b"message") -> bytes:
        """One complete event carrying `payload` (JSON or [DONE])."""
        parts = self._data_parts(payload) if self.multiline else [payload]
        lines = [b"data: " + p for p in parts]
        if self.event_lines:
            lines.insert(0, b"event: " + name)
        return self.eol.join(lines) + self.eol + self.eol

    def comment(self, text: str) -> bytes:
        """A comment line plus blank line; clients must ignore it."""
        return (":" + (" " + text if text else "")).encode() + self.eol + self.eol

    def _data_parts(self, payload: bytes) -> list[bytes]:
        """Splits JSON at up to three structural commas; joined with \\n it is the same JSON."""
        text = payload.decode("utf-8", "surrogateescape")
        commas = structural_commas(text)
        picks = sorted({commas[len(commas) * k // 4] for k in (1, 2, 3)}) if commas else []
        bounds = [0, *picks, len(text)]
        pieces = [text[a:b] for a, b in pairwise(bounds)]
        return [p.encode("utf-8", "surrogateescape") for p in pieces]
