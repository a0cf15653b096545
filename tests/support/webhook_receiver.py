"""A webhook receiver for the tests: a real HTTP server that records every request and answers
with the statuses it is told to, in order (then 200)."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.support.services import free_port, wait_until

__all__ = ["Received", "WebhookReceiver"]


@dataclass(frozen=True)
class Received:
    """One request as it arrived."""

    path: str
    headers: dict[str, str]
    body: bytes


class WebhookReceiver:
    """Records POSTs on ``host``; ``answer(*statuses)`` scripts the next answers."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = free_port()
        self.received: list[Received] = []
        self._answers: deque[int] = deque()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver._lock:
                    receiver.received.append(Received(self.path, dict(self.headers), body))
                    status = receiver._answers.popleft() if receiver._answers else 200
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", "/redirected")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((host, self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/hook"

    def answer(self, *statuses: int) -> None:
        """The statuses the next requests get, in order."""
        with self._lock:
            self._answers.extend(statuses)

    def requests(self, needle: bytes = b"") -> list[Received]:
        """The requests whose body holds ``needle``."""
        with self._lock:
            return [r for r in self.received if needle in r.body]

    def wait_for(self, needle: bytes, count: int, timeout: float = 30) -> list[Received]:
        """Wait until ``count`` requests holding ``needle`` arrived; them."""
        wait_until(lambda: len(self.requests(needle)) >= count, timeout,
                   f"{count} webhook request(s) with {needle!r}")
        return self.requests(needle)

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
