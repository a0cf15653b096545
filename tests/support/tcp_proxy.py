"""A TCP proxy on loopback that cuts or refuses connections at will, as a failing network
would: in front of Redis (the shutdown tests) or of the gateway (a browser's dropped stream)."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

from tests.support.services import free_port

__all__ = ["TcpProxy"]


class TcpProxy:
    """Forwards loopback connections to ``target_port``; ``cut()`` resets the open ones,
    ``refuse()`` also turns every new one away (a Redis at its client limit, a failing link)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._refusing = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", self.port), backlog=512)
        self.accepted = 0  # connections forwarded so far
        self._trip: tuple[bytes, float] | None = None
        self.tripped = threading.Event()

    @property
    def url(self) -> str:
        """As a Redis URL."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def http_url(self) -> str:
        """As an HTTP base URL."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> TcpProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def refuse(self) -> None:
        """Reset every open connection and every new one."""
        self._refusing.set()
        self.cut()

    def cut(self) -> None:
        """Reset every open connection (new ones are forwarded, unless refused)."""
        with self._lock:
            sockets, self._sockets = list(self._sockets), set()
        for sock in sockets:
            _reset(sock)

    def trip_after_reply(self, command: bytes, outage: float) -> None:
        """Once: deliver the first reply with data to ``command`` (a BRPOP that popped a
        message), then go down for ``outage`` seconds, as Redis failing at that instant."""
        self._trip = (command, outage)

    def allow(self) -> None:
        """Forward new connections again."""
        self._refusing.clear()

    def stop(self) -> None:
        self.refuse()
        with contextlib.suppress(OSError):
            self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._refusing.is_set():
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self.accepted += 1
                self._sockets.update((client, upstream))
            sent: list[bytes] = [b""]  # the client's last command on this connection
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b, sent, a is client),
                                 daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, sent: list[bytes],
              from_client: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if from_client:
                    sent[0] = data
                elif (outage := self._tripped_by(sent[0], data)) is not None:
                    while (whole := _reply_length(data)) is None or len(data) < whole:
                        data += source.recv(65536)  # the whole reply, however it came
                    with self._lock:
                        self._sockets -= {source, sink}
                    self.refuse()  # every other connection, and new ones, for the outage
                    threading.Timer(outage, self.allow).start()
                    sink.sendall(data)
                    sink.shutdown(socket.SHUT_WR)  # the reply arrives whole, then EOF
                    self.tripped.set()
                    return
                sink.sendall(data)
        _reset(sink)

    def _tripped_by(self, command: bytes, reply: bytes) -> float | None:
        with self._lock:
            trip = self._trip
            if trip is None or trip[0] not in command or not reply.startswith(b"*2"):
                return None
            self._trip = None
        return trip[1]


def _reply_length(data: bytes) -> int | None:
    """The length of a RESP reply of two bulk strings (``*2``, as BRPOP's), or None while
    its headers are not all in ``data``."""
    at = data.index(b"\r\n") + 2 if b"\r\n" in data else None
    for _ in range(2):
        if at is None or b"\r\n" not in data[at:]:
            return None
        end = data.index(b"\r\n", at)
        at = end + 2 + int(data[at + 1:end]) + 2  # "$<n>\r\n", n bytes, "\r\n"
    return at


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # a thread blocked reading it holds the file open: close() alone would send nothing
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
