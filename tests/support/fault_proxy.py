"""A fault-injecting TCP proxy for what the fake server cannot do itself.

It forwards bytes between the client and the fake upstream, and for requests
that name a given model it can cut the response with a TCP reset after N
bytes, or dribble it out a few bytes per read. Plans are consumed one per
request of that model, the last one repeating, like the fake's scripts.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from dataclasses import dataclass

from tests.support.services import free_port

__all__ = ["FaultProxy", "Plan"]


@dataclass(frozen=True)
class Plan:
    """What to do to one response."""

    reset_after: int | None = None  # send a TCP RST after this many response bytes
    piece: int | None = None  # forward the response this many bytes at a time
    pause: float = 0.0  # between pieces


_PASS = Plan()


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, proxy: FaultProxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = socket.create_connection(("127.0.0.1", proxy.target_port))
        self.plan = _PASS
        self.sent = 0

    def run(self) -> None:
        threading.Thread(target=self._requests, daemon=True).start()
        self._responses()

    def _requests(self) -> None:
        with contextlib.suppress(OSError):
            while data := self.client.recv(65536):
                plan = self.proxy.plan_for(data)
                if plan is not None:
                    self.plan, self.sent = plan, 0
                self.upstream.sendall(data)
        with contextlib.suppress(OSError):
            self.upstream.shutdown(socket.SHUT_WR)

    def _responses(self) -> None:
        try:
            while data := self.upstream.recv(65536):
                self._forward(data)
        except OSError:
            pass
        finally:
            self._close()

    def _forward(self, data: bytes) -> None:
        limit = self.plan.reset_after
        if limit is not None and self.sent + len(data) >= limit:
            self.client.sendall(data[: max(limit - self.sent, 0)])
            self._reset()
            raise OSError("reset by plan")
        step = self.plan.piece or len(data)
        for start in range(0, len(data), step):
            self.client.sendall(data[start:start + step])
            if self.plan.pause:
                time.sleep(self.plan.pause)
        self.sent += len(data)

    def _reset(self) -> None:
        # SO_LINGER with a zero timeout turns close() into a TCP RST; SHUT_RD first wakes
        # the request thread's recv, which would otherwise keep the socket (and the RST) alive
        self.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            self.client.shutdown(socket.SHUT_RD)
        self.client.close()

    def _close(self) -> None:
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.close()


class FaultProxy:
    """Listens on a free loopback port and forwards to ``target_port``."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._plans: dict[bytes, list[Plan]] = {}
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", self.port), backlog=256)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.close()

    def script(self, model: str, *plans: Plan) -> None:
        """Plans for the next requests naming ``model``; the last one repeats."""
        with self._lock:
            self._plans[f'"model":"{model}"'.encode()] = list(plans)

    def plan_for(self, request: bytes) -> Plan | None:
        """The plan for a request whose bytes name a scripted model, if any."""
        with self._lock:
            for needle, plans in self._plans.items():
                if needle in request:
                    return plans.pop(0) if len(plans) > 1 else plans[0]
        return None

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            link = _Link(self, client)
        except OSError:
            client.close()
            return
        link.run()
