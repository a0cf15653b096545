"""The OpenAI-format HTTP client: one pooled ``requests`` session per thread.

This is the edge where ``requests``/``urllib3`` errors become the project's
``UpstreamError`` classes (``raise ... from err``), and the one place every
upstream byte passes on the way in: the call's secrets are replaced there, so
no field, excerpt, title, chunk or log line made from a reply can carry them.
Redirects are off, bodies are read with a size cap, and every connection is
attached to the thread's ``CallHandle`` so the watchdog can close it (cancel,
total deadline).
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from api_tasks.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    InvalidResponseError,
    UpstreamError,
    UrlRefused,
)
from api_tasks.upstream.call_handle import CallHandle, current_handle
from api_tasks.upstream.job_urls import AddressGuard, AddressRefused
from api_tasks.upstream.redact import Redactor, scrub
from api_tasks.upstream.retry import parse_retry_after

__all__ = ["CallRequest", "HttpClient", "decode_json"]

_READ_SIZE = 65536
# what a requests Session sends by default (User-Agent, Accept-Encoding...), under the call's own
_BASE_HEADERS = dict(requests.utils.default_headers())
_ERROR_BODY_CAP = 65536
# what a stream may still send after its last event (the chunked coding's end), and how long
# it may take, for its connection to be kept
_DRAIN_BYTES = 65536
_DRAIN_SECONDS = 0.5
_HOSTS = 64  # hosts whose connections are kept (upstream deployments, webhook endpoints)
_TITLE = re.compile(rb"<title[^>]*>(.*?)</title>", re.I | re.S)
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 408: "timeout_error", 409: "conflict_error",
          422: "invalid_request_error", 429: "rate_limit_error"}


_guard = threading.local()  # the AddressGuard of the call this thread is making, if any


class _Tracked:
    """Reports its socket to the thread's CallHandle: on connect, and on each reuse.

    For a job that chose its URL, the host is resolved here and the socket goes to an
    address the guard allows (the name stays for the Host header and TLS).
    """

    sock: Any
    _dns_host: str
    port: int
    handle: CallHandle | None = None  # the call that uses it now, told of its socket

    def _new_conn(self) -> Any:
        guard: AddressGuard | None = getattr(_guard, "current", None)
        if guard is None:
            return super()._new_conn()  # type: ignore[misc]
        name = self._dns_host
        self._dns_host = guard.resolve(name, self.port)
        try:
            return super()._new_conn()  # type: ignore[misc]
        finally:
            self._dns_host = name

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        _attach(self)

    def request(self, *args: Any, **kwargs: Any) -> None:
        guard: AddressGuard | None = getattr(_guard, "current", None)
        if guard is not None and self.sock is not None:
            # a connection kept from an earlier call may have gone where this one may not
            peer = str(self.sock.getpeername()[0]).split("%", 1)[0]
            if not guard.permits(peer, self.port):
                raise AddressRefused(f"{self._dns_host} is connected to {peer}, which "
                                     "job_base_url_hosts does not name")
        _attach(self)
        super().request(*args, **kwargs)  # type: ignore[misc]


def _attach(conn: _Tracked) -> None:
    handle = current_handle()
    if handle is not None:
        handle.attach(conn.sock)
        conn.handle = handle


class _Released:
    """A pool whose connections forget their call as they come back: the next call on one
    may be another job's, on another thread, which the first job's abort must not cut."""

    def _put_conn(self, conn: Any) -> None:
        handle = getattr(conn, "handle", None)
        if handle is not None:
            handle.detach(conn.sock)
            conn.handle = None
        super()._put_conn(conn)  # type: ignore[misc]


class _TrackedHTTPConnection(_Tracked, HTTPConnection):
    pass


class _TrackedHTTPSConnection(_Tracked, HTTPSConnection):
    pass


class _TrackedPool(_Released, HTTPConnectionPool):
    ConnectionCls = _TrackedHTTPConnection


class _TrackedHTTPSPool(_Released, HTTPSConnectionPool):
    ConnectionCls = _TrackedHTTPSConnection


class _TrackedAdapter(HTTPAdapter):
    """An adapter whose connections report themselves to the current CallHandle."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _TrackedPool,
                                                   "https": _TrackedHTTPSPool}


@dataclass(frozen=True)
class CallRequest:
    """Everything one HTTP attempt needs."""

    url: str
    headers: dict[str, str]
    body: bytes
    connect_timeout: float
    read_timeout: float
    max_response_bytes: int
    secrets: tuple[str, ...] = ()
    guard: AddressGuard | None = None  # set when the job chose its URL


class HttpClient:
    """Sends OpenAI-format requests: a session per thread, one pool of connections for all,
    so that a job finds a warm connection (and TLS session) whatever thread runs it."""

    def __init__(self, pool_size: int = 4) -> None:
        # kept per host: as many as calls may be in flight at once (the job threads)
        self._adapter = _TrackedAdapter(pool_connections=_HOSTS, pool_maxsize=pool_size,
                                        max_retries=0)
        self._local = threading.local()

    def session(self) -> requests.Session:
        """This thread's session, created on first use."""
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            # no proxies or .netrc from the environment: keys come only from settings
            session.trust_env = False
            session.mount("http://", self._adapter)
            session.mount("https://", self._adapter)
            self._local.session = session
        return session

    def post_guarded(self, url: str, body: bytes, headers: dict[str, str],
                     guard: AddressGuard, timeout: float) -> int:
        """POST ``body`` to ``url`` (a webhook), connecting only where ``guard`` allows and
        following no redirect; the status (up to 64 KiB of the answer is read, then dropped).
        Raises ``requests.RequestException`` or ``OSError``."""
        _guard.current = guard
        try:
            with self.session().post(url, data=body, headers=headers, stream=True,
                                     timeout=(timeout, timeout), allow_redirects=False) as answer:
                read = 0
                for piece in answer.iter_content(_READ_SIZE):
                    read += len(piece)
                    if read >= _ERROR_BODY_CAP:
                        break
                return answer.status_code
        finally:
            _guard.current = None

    def send(self, handle: CallHandle, call: CallRequest) -> requests.Response:
        """POST and return the response with its body unread; errors raise ``UpstreamError``."""
        _guard.current = call.guard
        try:
            # prepared here and sent with nothing left to merge: Session.request's merging
            # of session settings costs more CPU than the rest of a job's call
            request = requests.PreparedRequest()
            request.prepare(method="POST", url=call.url, data=call.body,
                            headers={**_BASE_HEADERS, **call.headers})
            with handle.bound():
                response = self.session().send(
                    request, stream=True, timeout=(call.connect_timeout, call.read_timeout),
                    allow_redirects=False, verify=True, cert=None, proxies={})
        except requests.RequestException as err:
            raise _convert(err, handle, call) from err
        finally:
            _guard.current = None
        if response.status_code >= 300:
            with response:
                raise self._status_error(handle, response, call)
        return response

    def read_json(self, handle: CallHandle, response: requests.Response,
                  call: CallRequest) -> dict[str, Any]:
        """Read a whole JSON body (capped) and decode it."""
        with response:
            body = b"".join(self.reads(handle, response, call, call.max_response_bytes))
        return decode_json(body, response, call)

    def drain(self, response: requests.Response, rest: Iterator[bytes]) -> None:
        """Read the end of a body whose last event came (``rest``: its ``reads``), so that its
        connection is used again rather than closed, which would cost the next call a new
        connection (and TLS handshake); a server slow to end it (``_DRAIN_SECONDS`` in all),
        or sending more than ``_DRAIN_BYTES``, loses the connection instead. A body that ends
        at close is not read on: its connection is not kept anyway."""
        raw = response.raw
        sock = getattr(getattr(raw, "connection", None), "sock", None)
        if not raw.chunked or sock is None:
            return
        timeout = sock.gettimeout()
        deadline = time.monotonic() + _DRAIN_SECONDS
        try:
            sock.settimeout(_DRAIN_SECONDS)
            left = _DRAIN_BYTES
            for data in rest:
                left -= len(data)
                if left < 0 or time.monotonic() > deadline:
                    return
        except UpstreamError:
            return
        finally:
            if raw.connection is not None:  # not yet back in the pool, where another call
                with contextlib.suppress(OSError):  # may have it (and sets its own timeout)
                    sock.settimeout(timeout)

    def reads(self, handle: CallHandle, response: requests.Response, call: CallRequest,
              cap: int | None = None) -> Iterator[bytes]:
        """Yield the body as it arrives, secrets replaced; raise when it passes ``cap`` bytes."""
        seen = 0
        redactor = Redactor(call.secrets)
        raw = response.raw
        # decoded: servers behind nginx or Cloudflare may gzip their answers. A chunked body
        # (what streaming servers send) is read a chunk at a time through one generator,
        # which costs a third of what a read1 per chunk does; at most _READ_SIZE at once
        chunks = raw.read_chunked(_READ_SIZE, decode_content=True) if raw.chunked else None
        while True:
            try:
                data = next(chunks, b"") if chunks is not None else \
                    raw.read1(_READ_SIZE, decode_content=True)
            except (urllib3.exceptions.HTTPError, OSError) as err:
                raise _convert(err, handle, call) from err
            if not data:
                if handle.reason is not None:
                    raise _aborted(handle)
                if tail := redactor.close():
                    yield tail
                return
            seen += len(data)
            if cap is not None and seen > cap:
                raise InvalidResponseError(
                    f"upstream response exceeded the {cap}-byte cap",
                    code="response_too_large", status=response.status_code)
            if data := redactor.feed(data):
                yield data

    def _status_error(self, handle: CallHandle, response: requests.Response,
                      call: CallRequest) -> UpstreamError:
        status = response.status_code
        if status < 400:
            return InvalidResponseError(
                f"upstream answered HTTP {status} (redirects are not followed)",
                code="unexpected_redirect", status=status)
        try:
            body = b"".join(self.reads(handle, response, call, _ERROR_BODY_CAP))
        except InvalidResponseError:
            body = b""
        message, etype, code, param = _describe_error(status, body, response, call.secrets)
        error = APIStatusError(
            message, status=status, code=code, param=param,
            type=etype or _TYPES.get(status, "server_error" if status >= 500 else "api_error"),
            retry_after=parse_retry_after(response.headers, time.time()))
        error.headers = response.headers  # what it says of its limits is read from them
        return error


def decode_json(body: bytes, response: requests.Response, call: CallRequest) -> dict[str, Any]:
    """Parse a JSON body; an HTML page or garbage becomes a clear error."""
    try:
        data = json.loads(body)
    except ValueError as err:
        raise InvalidResponseError(
            f"upstream answered HTTP {response.status_code} with {_what(body, response)}, "
            "not JSON", code="invalid_json", status=response.status_code) from err
    if not isinstance(data, dict):
        raise InvalidResponseError("upstream JSON is not an object", code="invalid_json",
                                   status=response.status_code)
    if data.get("error") is not None:
        message, etype, code, param = _describe_error(response.status_code, body, response,
                                                      call.secrets)
        raise APIStatusError(message, status=response.status_code,
                             code=code, type=etype or "api_error", param=param)
    return data


def _what(body: bytes, response: requests.Response) -> str:
    if b"<html" in body[:2048].lower() or "html" in response.headers.get("content-type", ""):
        title = _TITLE.search(body[:65536])
        name = title.group(1).decode("utf-8", "replace").strip() if title else "untitled"
        return f"an HTML page ({name!r})"
    if not body:
        return "an empty body"
    return f"{len(body)} bytes starting {body[:80].decode('utf-8', 'replace')!r}"


def _describe_error(status: int, body: bytes, response: requests.Response,
                    secrets: tuple[str, ...]) -> tuple[str, str | None, str, str | None]:
    """(message, type, code, param) from the error body servers actually send.

    The body's bytes were redacted on the way in; its decoded strings are scrubbed again,
    since JSON escapes (``\\u0073k-...``) can spell a key the bytes did not show.
    """
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    error = data.get("error", data) if isinstance(data, dict) else None
    if isinstance(error, str):
        error = {"message": error}
    if isinstance(error, dict) and error.get("message"):
        code = error.get("code")
        return (scrub(str(error["message"]), secrets),
                _str_or_none(error.get("type"), secrets),
                scrub(str(code), secrets) if code not in (None, "") else f"http_{status}",
                _str_or_none(error.get("param"), secrets))
    return f"upstream answered HTTP {status} with {_what(body, response)}", None, \
        f"http_{status}", None


def _str_or_none(value: Any, secrets: tuple[str, ...]) -> str | None:
    return None if value is None else scrub(str(value), secrets)


def _aborted(handle: CallHandle) -> UpstreamError:
    error = handle.error()
    assert error is not None
    return error


def _convert(err: BaseException, handle: CallHandle, call: CallRequest) -> UpstreamError:
    """Map a transport exception to the project's error classes."""
    if handle.reason is not None:
        return _aborted(handle)
    if isinstance(err, requests.exceptions.ConnectTimeout):
        return APITimeoutError(f"connecting to the upstream timed out after "
                               f"{call.connect_timeout:g}s", code="connect_timeout")
    if isinstance(err, (requests.exceptions.ReadTimeout, urllib3.exceptions.ReadTimeoutError,
                        TimeoutError)):
        return APITimeoutError(f"the upstream sent nothing for {call.read_timeout:g}s",
                               code="read_timeout")
    refused = _cause(err, AddressRefused)
    if refused is not None:
        return UrlRefused(f"base_url: {refused}", param="base_url")
    if _caused_by(err, ConnectionRefusedError):
        return APIConnectionError(f"connection refused by {_host(call.url)}",
                                  code="connection_refused")
    if _caused_by(err, ConnectionResetError):
        return APIConnectionError("the upstream reset the connection", code="connection_reset")
    return APIConnectionError(f"connection to the upstream failed: {type(err).__name__}: "
                              f"{scrub(str(err), call.secrets)[:300]}", code="connection_error")


def _caused_by(err: BaseException, kind: type[BaseException]) -> bool:
    return _cause(err, kind) is not None


def _cause(err: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The exception of ``kind`` somewhere in ``err``'s causes or arguments, if any."""
    seen: BaseException | None = err
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, kind):
            return seen
        found = next((a for a in seen.args if isinstance(a, kind)), None)
        if found is not None:
            return found
        nested = next((a for a in seen.args if isinstance(a, BaseException)), None)
        seen = seen.__cause__ or seen.__context__ or nested
    return None


def _host(url: str) -> str:
    return url.split("//", 1)[-1].split("/", 1)[0]
