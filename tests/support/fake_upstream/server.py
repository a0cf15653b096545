"""The loopback HTTP server, its request routing, and the test-facing FakeUpstream API."""

from __future__ import annotations

import contextlib
import socket
import socketserver
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .payloads import DEFAULT_MODEL, BadRequest, Exchange, Json, error_body, parse_body
from .quota import Quota, request_cost
from .runners import run
from .steps import Reply, Step
from .wire import ClientGone, Wire, dumps

_JSON = "application/json"
_KINDS = {"/v1/chat/completions": "chat", "/v1/completions": "completion",
          "/v1/embeddings": "embedding", "/v1/responses": "response"}
_ECHO = Reply()


@dataclass(frozen=True)
class Recorded:
    """One request as the server received it."""

    path: str  # without the query string
    headers: dict[str, str]  # names lower-cased
    body: dict[str, Any] | None  # None when the body is not a JSON object
    raw: bytes
    at: float  # time.monotonic() on arrival
    port: int = 0  # the client's port: one per connection, so a reused connection shows


class _Script:
    """A model's steps and how far its requests have got through them."""

    def __init__(self, steps: tuple[Step, ...]) -> None:
        """Starts at the first step."""
        self.steps = steps
        self.pos = 0

    def next(self) -> Step:
        """The step for the next request; the last one repeats forever."""
        step = self.steps[min(self.pos, len(self.steps) - 1)]
        self.pos += 1
        return step


class FakeUpstream:
    """An OpenAI-compatible server on loopback whose answers tests can script."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, record: bool = True) -> None:
        """Configures the server; start() binds it."""
        self.host, self.port, self.record = host, port, record
        self.stopping = False
        self.first_byte_delay = 0.0  # seconds every request waits before it is answered
        self._cond = threading.Condition()  # guards scripts, recordings and counters
        self._scripts: dict[str, _Script] = {}
        self._recorded: list[tuple[str | None, Recorded]] = []
        self._counts: dict[str | None, int] = {}
        self._gone: dict[str | None, int] = {}
        self._quotas: dict[str, Quota] = {}
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self._server: _Server | None = None

    @property
    def base_url(self) -> str:
        """http://host:port without /v1."""
        if self._server is None:
            raise RuntimeError("FakeUpstream is not started")
        return f"http://{self.host}:{self.port}"

    def start(self) -> FakeUpstream:
        """Binds and serves on a daemon thread."""
        server = _Server((self.host, self.port), _Handler)
        server.upstream = self
        self.port = server.server_address[1]
        self._server, self.stopping = server, False
        threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fake-upstream:{self.port}",
            daemon=True,
        ).start()
        return self

    def stop(self) -> None:
        """Stops accepting and cuts open connections so no handler lingers."""
        server, self._server = self._server, None
        if server is None:
            return
        self.stopping = True  # disconnects from here on are ours, not the client's
        server.shutdown()
        server.server_close()
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):  # already closed by its handler
                conn.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> FakeUpstream:
        """Starts the server."""
        return self.start()

    def __exit__(self, *exc: object) -> None:
        """Stops the server."""
        self.stop()

    def script(self, model: str, *steps: Step) -> None:
        """Requests for `model` consume `steps` in order; the last step repeats."""
        if not steps:
            raise ValueError("script() needs at least one step")
        with self._cond:
            self._scripts[model] = _Script(steps)

    def requests(self, model: str | None = None) -> list[Recorded]:
        """Every request received (for `model`), in arrival order."""
        with self._cond:
            return [r for m, r in self._recorded if model is None or m == model]

    def wait_for_requests(self, model: str | None, n: int, timeout: float = 10) -> list[Recorded]:
        """Waits until `n` requests for `model` have arrived, then returns them all."""
        if not self.record:
            raise RuntimeError("wait_for_requests needs record=True")
        with self._cond:
            ok = self._cond.wait_for(lambda: self._counts.get(model, 0) >= n, timeout)
            found = [r for m, r in self._recorded if m == model]
        if not ok:
            raise AssertionError(f"{len(found)}/{n} requests for {model!r} after {timeout}s")
        return found

    def disconnects(self, model: str | None) -> int:
        """How often a client left `model`'s response before it was finished."""
        with self._cond:
            return self._gone.get(model, 0)

    def wait_for_disconnect(self, model: str | None, timeout: float = 10, count: int = 1) -> None:
        """Waits until `model` has seen `count` client disconnects."""
        with self._cond:
            ok = self._cond.wait_for(lambda: self._gone.get(model, 0) >= count, timeout)
            seen = self._gone.get(model, 0)
        if not ok:
            raise AssertionError(f"{seen}/{count} disconnects for {model!r} after {timeout}s")

    def reset(self) -> None:
        """Forgets scripts, recordings and counters."""
        with self._cond:
            self._scripts.clear()
            self._recorded.clear()
            self._counts.clear()
            self._gone.clear()
            self._quotas.clear()

    def enforce(self, prefix: str, rpm: float | None = None, tpm: float | None = None,
                burst: float = 1.0, report: bool = True) -> Quota:
        """Answer 429 to requests for models starting with ``prefix`` past these limits
        (``report``: and say what is left in x-ratelimit-* headers, as OpenAI does)."""
        quota = Quota(rpm, tpm, burst, report)
        with self._cond:
            self._quotas[prefix] = quota
        return quota

    def _quota_for(self, model: str | None) -> Quota | None:
        if not self._quotas or model is None:
            return None
        return next((q for p, q in self._quotas.items() if model.startswith(p)), None)

    def _next_step(self, model: str | None) -> Step:
        """The step answering a request for `model`; echo when unscripted."""
        script = self._scripts.get(model) if model is not None else None
        if script is None:  # the lock-free fast path for benchmarks
            return _ECHO
        with self._cond:
            return script.next()

    def _arrived(self, model: str | None, rec: Recorded) -> None:
        """Records a request and wakes waiters."""
        with self._cond:
            self._recorded.append((model, rec))
            self._counts[model] = self._counts.get(model, 0) + 1
            self._cond.notify_all()

    def _left(self, model: str | None) -> None:
        """Counts a client disconnect and wakes waiters."""
        if self.stopping:
            return
        with self._cond:
            self._gone[model] = self._gone.get(model, 0) + 1
            self._cond.notify_all()

    def _track(self, conn: socket.socket, add: bool) -> None:
        """Remembers open connections so stop() can cut them."""
        with self._conns_lock:
            (self._conns.add if add else self._conns.discard)(conn)

    def _models(self) -> Json:
        """The /v1/models listing: the default model and every scripted one."""
        with self._cond:
            names = [DEFAULT_MODEL, *sorted(self._scripts)]
        data = [
            {"id": n, "object": "model", "created": 0, "owned_by": "fake-upstream"} for n in names
        ]
        return {"object": "list", "data": data}


class _Server(ThreadingHTTPServer):
    """Threaded, keep-alive friendly, and quiet about clients that hang up."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 2048  # benchmark bursts must not overflow the accept backlog
    upstream: FakeUpstream

    def server_bind(self) -> None:
        """Binds without HTTPServer's getfqdn(), which can stall on a reverse DNS lookup."""
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stays silent for disconnects; real bugs still print a traceback."""
        if isinstance(sys.exc_info()[1], OSError) or self.upstream.stopping:
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    """Reads one request, records it, and hands it to the routing."""

    protocol_version = "HTTP/1.1"  # keep-alive: clients pool connections
    disable_nagle_algorithm = True  # small writes go out now, no delayed-ACK stalls
    server: _Server

    def setup(self) -> None:
        """Registers the connection with the upstream."""
        super().setup()
        self.server.upstream._track(self.connection, True)

    def finish(self) -> None:
        """Unregisters the connection; a dead socket is not an error."""
        self.server.upstream._track(self.connection, False)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """No per-request logging: benchmarks run thousands of requests."""

    def do_POST(self) -> None:
        """Every method goes through the same routing."""
        self._serve()

    do_GET = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_POST

    def _serve(self) -> None:
        """Records the request, answers it, and decides whether to keep the connection."""
        raw = self._read_body()
        body = parse_body(raw) if raw else None
        name = body.get("model") if body is not None else None
        model = name if isinstance(name, str) else None
        path = self.path.split("?", 1)[0]
        upstream = self.server.upstream
        if upstream.record:
            headers = {k.lower(): v for k, v in self.headers.items()}
            upstream._arrived(model, Recorded(path, headers, body, raw, time.monotonic(),
                                                    self.client_address[1]))
        wire = Wire(self.connection)
        if upstream.first_byte_delay:
            time.sleep(upstream.first_byte_delay)  # an overloaded server, slow to answer
        try:
            _route(upstream, self.command, path, body, model, wire)
        except ClientGone:
            wire.must_close = True
            upstream._left(model)
        if wire.must_close:
            self.close_connection = True

    def _read_body(self) -> bytes:
        """The request body, by Content-Length or chunked transfer coding."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked()
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        return self.rfile.read(length) if length > 0 else b""

    def _read_chunked(self) -> bytes:
        """Decodes a chunked request body and skips any trailers."""
        parts: list[bytes] = []
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            parts.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass
        return b"".join(parts)


def _route(
    upstream: FakeUpstream,
    method: str,
    path: str,
    body: Json | None,
    model: str | None,
    wire: Wire,
) -> None:
    """Dispatches to the models list, a 404/400 error, or the model's next step."""
    kind = _KINDS.get(path) if method == "POST" else None
    if method == "GET" and path == "/v1/models":
        wire.respond(200, _JSON, dumps(upstream._models()))
    elif kind is None:
        message = f"Invalid URL ({method} {path})"
        wire.respond(
            404, _JSON, dumps(error_body(message, "invalid_request_error", None, "not_found"))
        )
    elif body is None:
        message = "We could not parse the JSON body of your request."
        wire.respond(400, _JSON, dumps(error_body(message, "invalid_request_error")))
    elif (limit := _over_quota(upstream, model, body, wire)) is not None:
        error = error_body(f"Rate limit reached for {limit} per min.", "requests", None,
                           "rate_limit_exceeded")
        wire.respond(429, _JSON, dumps(error), {"Retry-After": "1"})
    else:
        try:
            ex = Exchange.build(kind, body, wire)
        except BadRequest as exc:
            error = error_body(str(exc), "invalid_request_error", exc.param)
            wire.respond(400, _JSON, dumps(error))
            return
        run(ex, upstream._next_step(model))


def _over_quota(upstream: FakeUpstream, model: str | None, body: Json, wire: Wire) -> str | None:
    """The limit a request is over (charged on arrival, as OpenAI does); the answer carries
    the quota's x-ratelimit-* headers either way, when it reports them."""
    quota = upstream._quota_for(model)
    if quota is None:
        return None
    refused = quota.take(request_cost(body), model or "")
    if quota.report:
        wire.extra = quota.headers()
    return refused
