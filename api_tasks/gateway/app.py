"""The gateway's ASGI app: the OpenAI-compatible endpoints, the jobs API, and health.

Everything runs on the event loop (only checking a large job goes to a thread). Submits go
through ``AsyncEnqueuer`` and reads through ``AsyncJobStore`` and ``AsyncJob``: the record,
message and event code the Python producer runs too.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fnmatch
import hashlib
import importlib.resources
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import anyio
import orjson
import redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from api_tasks import metrics, tracing
from api_tasks.connections import UNAVAILABLE, connect_async, reason, text
from api_tasks.errors import BrokerUnavailable, JobFailed, StreamRestarted
from api_tasks.gateway.auth import Keyring, StreamTokens
from api_tasks.gateway.batches import cancel_batch, create_batch, get_batch, list_batches
from api_tasks.gateway.errors import GatewayError, job_error, openai_error
from api_tasks.gateway.files import (
    delete_file,
    file_content,
    get_file,
    list_files,
    upload_file,
)
from api_tasks.gateway.listing import limit, owned, page, page_response
from api_tasks.gateway.submit import Submitter, unavailable
from api_tasks.gateway.webhooks import list_deliveries
from api_tasks.json_codec import dumps, loads_exact
from api_tasks.record.calls import AsyncShell
from api_tasks.record.cluster import cluster_reader
from api_tasks.record.job_record import TERMINAL, Field
from api_tasks.record.keys import Keys
from api_tasks.record.reader import (
    BATCH_END,
    IDLE,
    AsyncJob,
    ChunkFilter,
    EventsGone,
)
from api_tasks.record.store import AsyncJobStore
from api_tasks.record.webhooks import job_notifier
from api_tasks.record.workers import alive
from api_tasks.spec import ENDPOINTS, KINDS, Kind, kind_of
from config.settings import GatewayKey, Settings

__all__ = ["Gateway", "create_app"]

log = logging.getLogger(__name__)
T = TypeVar("T")
_SSE_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
_QUEUE_HEADER = "x-api-tasks-queue"
_POOL = 256  # Redis connections of one gateway process
_SECRET_TTL = 365 * 86400  # renewed by every gateway's reads
_SECRET_REREAD = 60.0  # seconds a gateway signs with its copy of the shared secret unread
_RETRY = b"retry: 1000\n\n"  # a dropped EventSource comes back within a second


class Gateway:
    """What every request shares in one gateway process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # a connection is held for one call at a time (waiting readers listen on the store's
        # hub): a few hundred serve thousands of readers, and bound the memory they take
        self.redis = connect_async(settings.redis.state(), max_connections=_POOL)
        self.keys = Keys.of(settings)
        self.store = AsyncJobStore(self.redis, self.keys, settings.jobs.result_ttl,
                                   settings.jobs.queued_ttl, job_notifier(self.keys, settings))
        # the broker's Redis, for the task messages (the state's own, unless apart)
        self.broker = connect_async(settings.redis, max_connections=_POOL) \
            if settings.redis.split else self.redis
        self.submitter = Submitter(settings, self.store, AsyncShell(self.broker)
                                   if settings.redis.split else None)
        self.keyring = Keyring(settings.gateway)
        self._tokens: StreamTokens | None = None  # settled at start, or once Redis answers
        self._read_at = 0.0  # when the shared secret was last read (monotonic)
        metrics.register_cluster(cluster_reader(settings, self.keys))  # read on a thread

    async def start(self) -> None:
        """Connect and load the submit's scripts now, not on the first request, then settle
        the stream-token secret; with Redis away it serves anyway, 503s until Redis is back."""
        await anyio.to_thread.run_sync(tracing.warm)  # the SDK's imports, off the loop
        try:
            await self.submitter.enqueuer.warm()
            await self.stream_tokens()
        except _UNAVAILABLE_OR_SAID as err:  # (a refused password too, as a worker waits)
            log.warning("gateway: serving 503s until Redis answers (%s)", reason(err))

    async def stream_tokens(self, again: bool = False) -> StreamTokens:
        """What signs and checks stream tokens: its secret configured, or one the gateways
        share through Redis (read at the first need once Redis answers, if not at start, then
        again every minute, or now with ``again``)."""
        configured = self.settings.gateway.token_secret
        if configured is not None:
            if self._tokens is None:
                self._tokens = StreamTokens(configured.get_secret_value().encode(),
                                            self.settings.gateway.stream_token_ttl)
            return self._tokens
        if self._tokens is None or again or \
                time.monotonic() - self._read_at > _SECRET_REREAD:
            try:
                secret = await self._shared_secret()
            except UNAVAILABLE:
                if self._tokens is None:
                    raise
                return self._tokens  # Redis away: the copy read last serves meanwhile
            self._read_at = time.monotonic()
            if self._tokens is None or secret != self._tokens.secret:
                self._tokens = StreamTokens(secret, self.settings.gateway.stream_token_ttl)
        return self._tokens

    async def _shared_secret(self) -> bytes:
        """The secret in Redis; if it is gone (Redis lost it, or it lapsed), the one this
        gateway signs with is put back (a new one at first), so the gateways agree again."""
        name = self.keys.gateway_secret()
        shared = await self.redis.getex(name, ex=_SECRET_TTL)
        if shared is None:
            mine = self._tokens.secret if self._tokens else secrets.token_hex(32).encode()
            await self.redis.set(name, mine, nx=True, ex=_SECRET_TTL)
            shared = await self.redis.getex(name, ex=_SECRET_TTL)
            if shared is None:  # gone again in between (a failover, a flush): a 503
                raise redis.ConnectionError("the stream-token secret is being settled")
        return text(shared).encode()

    async def token_valid(self, token: str, job_id: str, owner: str) -> bool:
        """Whether a stream token is good: signed with the shared secret as this gateway
        knows it, or as Redis now holds it (another gateway put it back after a loss)."""
        tokens = await self.stream_tokens()
        if tokens.check(token, job_id, owner):
            return True
        now = await self.stream_tokens(again=True)
        return now is not tokens and now.check(token, job_id, owner)

    async def close(self) -> None:
        """Release the Redis connections."""
        await self.redis.aclose()
        if self.broker is not self.redis:
            await self.broker.aclose()

    def key(self, request: Request) -> GatewayKey:
        """The caller's key (401 without a valid one)."""
        return self.keyring.key_for(request.headers.get("authorization"),
                                    request.headers.get("host"))

    async def body(self, request: Request) -> tuple[dict[str, Any], int]:
        """The request's JSON object, read up to ``jobs.max_request_bytes`` (413 past it),
        and its size."""
        limit = self.settings.jobs.max_request_bytes
        kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if self.keyring.open and kind != "application/json":
            # a cross-site form post cannot send this type: no job from a web page
            raise GatewayError(415, "send the body as Content-Type: application/json",
                               code="unsupported_media_type")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise _too_large(limit)
        data = bytearray()
        async for piece in request.stream():
            data += piece
            if len(data) > limit:
                raise _too_large(limit)
        try:
            body = loads_exact(data)
        except ValueError as err:  # orjson's decode error is one too
            raise GatewayError(400, f"the body is not valid JSON: {err}",
                               code="invalid_json") from None
        if not isinstance(body, dict):
            raise GatewayError(400, "the body must be a JSON object", code="invalid_json")
        return body, len(data)

    async def owned(self, key: GatewayKey, job_id: str) -> dict[str, str]:
        """The record of a job of this key (404 for any other, as if it did not exist)."""
        return owned(await self.store.info(job_id), key, f"no job {job_id!r}",
                     "job_not_found")

    async def job_object(self, job_id: str, info: dict[str, str], key: GatewayKey,
                         *, token: bool = False, response: bool = True) -> dict[str, Any]:
        """A job as the jobs API shows it; without ``response`` (a listing) its response is
        left out and its error comes from the record, so no stored result is read."""
        ended = info.get(Field.STATUS) in TERMINAL
        if response:
            stored = await self.store.result(job_id) if ended else None
        else:
            stored = {"error": json.loads(info[Field.ERROR])} if info.get(Field.ERROR) else None
        def number(name: Field) -> float | None:
            return float(info[name]) if info.get(name) else None
        kind = kind_of(info.get(Field.KIND) or "")
        return {
            "id": job_id, "object": "job", "status": info.get(Field.STATUS),
            "url": ENDPOINTS[kind].path if kind else None,
            "created_at": number(Field.CREATED_AT), "started_at": number(Field.STARTED_AT),
            "finished_at": number(Field.FINISHED_AT),
            "attempts": int(info.get(Field.ATTEMPTS) or 0),
            "response": (stored or {}).get("response"), "error": (stored or {}).get("error"),
            "metadata": json.loads(info[Field.METADATA]) if info.get(Field.METADATA) else None,
            "stream_token": (await self.stream_tokens()).issue(job_id, key.name)
            if token else None,
        }


class _JobJSON(JSONResponse):
    """A JSON answer carrying a job's response (up to tens of MiB), rendered by orjson."""

    # on the loop: a thread would not free it (the encoder holds the GIL), and orjson takes
    # a tenth of the standard library encoder's time

    def render(self, content: Any) -> bytes:
        return dumps(content)


def _too_large(limit: int) -> GatewayError:
    return GatewayError(413, f"the body is larger than jobs.max_request_bytes ({limit} bytes)",
                        code="request_too_large")


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> tuple[bool, T | None]:
    """Run ``work`` until done or the client goes away: (done, its result); what ``work``
    raises is raised here as itself."""
    result: list[T] = []
    failed: list[BaseException] = []

    async def run(scope: anyio.CancelScope) -> None:
        try:
            result.append(await work)
        except Exception as err:  # raised below, outside the task group's exception group
            failed.append(err)
        scope.cancel()

    async with anyio.create_task_group() as group:
        group.start_soon(run, group.cancel_scope)
        await _until_disconnected(request)
        group.cancel_scope.cancel()
    if failed:
        raise failed[0]
    return (True, result[0]) if result else (False, None)


# the OpenAI-compatible endpoints

async def chat_completions(request: Request) -> Response:
    """``POST /v1/chat/completions``: the body is the job."""
    return await _openai_call(request, Kind.CHAT)


async def completions(request: Request) -> Response:
    """``POST /v1/completions``: the body is the job."""
    return await _openai_call(request, Kind.COMPLETION)


async def embeddings(request: Request) -> Response:
    """``POST /v1/embeddings``: the body is the job (never streamed)."""
    return await _openai_call(request, Kind.EMBEDDING)


async def responses(request: Request) -> Response:
    """``POST /v1/responses``: the body is the job."""
    return await _openai_call(request, Kind.RESPONSE)


async def _openai_call(request: Request, kind: Kind) -> Response:
    gateway: Gateway = request.app.state.gateway
    key = gateway.key(request)
    body, size = await gateway.body(request)
    job_id, record = await gateway.submitter.submit(
        key, kind, body, request.headers.get(_QUEUE_HEADER),
        idempotency_key=request.headers.get("idempotency-key"), size=size)
    headers = {"x-request-id": job_id}
    job = AsyncJob(gateway.store, job_id, submitted=record is not None)
    # a job that may be asked for again (its Idempotency-Key) outlives any one client
    cancellable = "idempotency-key" not in request.headers
    if body.get("stream") is True:
        return await _openai_stream(gateway, request, job, headers, cancellable,
                                    kind is Kind.RESPONSE)
    done, outcome = await _unless_disconnected(request, _settle(job))
    if not done:
        if cancellable:
            await _gone(gateway, job)
        return Response(status_code=499)
    assert outcome is not None
    response, error = outcome
    if error is not None:
        return _with(job_error(error), headers)
    return _JobJSON(response, headers=headers)


async def _settle(job: AsyncJob) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """A job's end: (response, None) or (None, its error object)."""
    try:
        return await job.result(), None
    except JobFailed as err:  # JobCancelled too
        return None, err.error


async def _gone(gateway: Gateway, job: AsyncJob) -> None:
    """The client of a synchronous call went away: cancel its job, unless told not to."""
    if gateway.settings.gateway.cancel_on_disconnect:
        with anyio.CancelScope(shield=True), contextlib.suppress(redis.RedisError):
            await gateway.store.cancel(job.id)


async def _openai_stream(gateway: Gateway, request: Request, job: AsyncJob,
                         headers: dict[str, str], cancellable: bool, typed: bool) -> Response:
    """A streamed call: ``data:`` frames and ``[DONE]``, or for a responses stream (``typed``)
    frames named by their ``event:`` type, ending with the response's closing event."""
    sequence = [-1]  # a responses stream's last sequence_number: its error event comes next
    frames = _openai_frames(gateway, job, typed, sequence)
    # the first frame in a task of its own: waiting for it with a deadline must not end frames
    pending: asyncio.Future[bytes] = asyncio.ensure_future(anext(frames, b""))
    settings = gateway.settings.gateway
    try:
        # the status is decided by the first chunk or the error if they come within the
        # hold; the client may leave first
        stayed, _ = await _unless_disconnected(
            request, asyncio.wait({pending}, timeout=settings.stream_hold))
    except BaseException:
        pending.cancel()
        raise
    if not stayed:
        pending.cancel()
        if cancellable:
            await _gone(gateway, job)
        return Response(status_code=499)
    if pending.done():
        try:
            pending.result()
        except JobFailed as err:
            return _with(job_error(err.error), headers)
        except EventsGone:  # ended long ago: its stream expired, its result may not have
            _, error = await _settle(job)
            return _with(job_error(error or _EXPIRED), headers)

    async def body() -> AsyncIterator[bytes]:
        ended = False
        try:
            try:
                while not pending.done():  # held past stream_hold: the status is sent
                    if not (await asyncio.wait({pending}, timeout=settings.keepalive))[0]:
                        yield b": keep-alive\n"
                yield pending.result() or b""
                async for frame in frames:
                    yield frame
                if not typed:
                    yield b"data: [DONE]\n\n"
            except (JobFailed, StreamRestarted, EventsGone, GatewayError,
                    redis.RedisError) as err:
                error = _stream_error(err)
                # a responses stream's error event has OpenAI's shape: no error class in it
                yield _frame({**error, "type": "error", "sequence_number": sequence[0] + 1},
                             typed) if typed else _data({"error": error})
            ended = True
        finally:
            pending.cancel()  # the client left while it was held
            if not ended and cancellable:
                await _gone(gateway, job)

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={**headers, **_SSE_HEADERS})


async def _openai_frames(gateway: Gateway, job: AsyncJob, typed: bool,
                         sequence: list[int]) -> AsyncIterator[bytes]:
    """The job's chunks as ``data:`` frames (``typed``: each named by its type); a keep-alive
    is one comment line (an OpenAI SDK fails on a blank line after one); raises the job's
    failure."""
    chunks = ChunkFilter(job.id)
    started = False
    pending: list[bytes] = []  # the chunks one read brought, written as one
    with _redis_errors():
        after = await job.attempt_start()
    async for event in job.events(after=after, idle=gateway.settings.gateway.keepalive,
                                  batched=True):
        if event is IDLE:
            if started:
                yield b": keep-alive\n"
            continue
        if event is BATCH_END:
            if pending:
                yield b"".join(pending)
                pending.clear()
            continue
        try:
            chunk = chunks.chunk(event)
        except Exception:
            if pending:  # what came before the failure goes out first
                yield b"".join(pending)
            raise
        if chunk is not None:
            started = True
            pending.append(_frame(chunk, typed))
            if typed and isinstance(chunk.get("sequence_number"), int):
                sequence[0] = chunk["sequence_number"]
    if pending:
        yield b"".join(pending)


_EXPIRED = {"message": "the job ended and its stream and result have expired",
            "type": "server_error", "code": "result_missing", "status": 410}


def _stream_error(err: Exception) -> dict[str, Any]:
    """What went wrong after the first chunk, as the error object of a ``data:`` event."""
    if isinstance(err, JobFailed):
        error = err.error
    elif isinstance(err, StreamRestarted):
        error = {"message": str(err), "type": "server_error", "code": "stream_restarted"}
    elif isinstance(err, EventsGone):
        error = _EXPIRED
    else:
        error = {"message": "the queue became unavailable", "type": "server_error",
                 "code": "queue_unavailable"}
    return {k: error.get(k) for k in ("message", "type", "param", "code")}


def _data(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _frame(chunk: dict[str, Any], typed: bool) -> bytes:
    """A chunk's frame; a responses stream names each event by its type, as OpenAI does."""
    kind = chunk.get("type") if typed else None
    if isinstance(kind, str) and kind.isprintable():
        return b"event: " + kind.encode() + b"\n" + _data(chunk)
    return _data(chunk)


async def models(request: Request) -> Response:
    """``GET /v1/models``: the models the configured upstreams name (globs left out)."""
    gateway: Gateway = request.app.state.gateway
    key = gateway.key(request)
    seen: dict[str, str] = {}
    for upstream in gateway.settings.upstreams:
        names = [*upstream.models, *([upstream.default_model] if upstream.default_model else [])]
        for name in names:
            if not any(c in name for c in "*?[") and name not in seen and \
                    any(fnmatch.fnmatchcase(name, g) for g in key.models):
                seen[name] = upstream.name
    data = [{"id": name, "object": "model", "created": 0, "owned_by": owner}
            for name, owner in seen.items()]
    return JSONResponse({"object": "list", "data": data})


# the jobs API

async def create_job(request: Request) -> Response:
    """``POST /v1/jobs``: enqueue and answer 202 with the job at once."""
    gateway: Gateway = request.app.state.gateway
    key = gateway.key(request)
    body, size = await gateway.body(request)
    url, job_body = body.get("url"), body.get("body")
    if url not in KINDS:
        raise GatewayError(400, f"url must be one of {', '.join(KINDS)}", param="url",
                           code="invalid_url")
    if not isinstance(job_body, dict):
        raise GatewayError(400, "body must be a JSON object", param="body", code="invalid_body")
    metadata = body.get("metadata")
    if metadata is not None and not (isinstance(metadata, dict) and len(metadata) <= 16):
        raise GatewayError(400, "metadata must be an object of at most 16 pairs",
                           param="metadata", code="invalid_metadata")
    queue = body.get("queue") or request.headers.get(_QUEUE_HEADER)
    notify = body.get("notify", False)
    if not isinstance(notify, bool):
        raise GatewayError(400, "notify must be true or false", param="notify",
                           code="invalid_notify")
    job_id, record = await gateway.submitter.submit(
        key, KINDS[url], job_body, queue, metadata=metadata,
        idempotency_key=request.headers.get("idempotency-key"), size=size, notify=notify)
    info = record if record is not None else await gateway.owned(key, job_id)
    return _JobJSON(await gateway.job_object(job_id, info, key, token=True), status_code=202,
                        headers={"x-request-id": job_id})


async def list_jobs(request: Request) -> Response:
    """``GET /v1/jobs?limit=&after=``: the caller's jobs, newest first, OpenAI's list shape
    (each without its response, which can be large: ``GET /v1/jobs/{id}`` has it)."""
    gateway: Gateway = request.app.state.gateway
    key = gateway.key(request)
    count = limit(request, 20, 100)
    after = request.query_params.get("after") or None
    with _redis_errors():
        jobs, more = page(await gateway.store.owned(key.name, after, count), after, "job")
    data = [await gateway.job_object(job_id, info, key, token=True, response=False)
            for job_id, info in jobs]
    return page_response(data, more)


async def get_job(request: Request) -> Response:
    """``GET /v1/jobs/{id}``."""
    gateway: Gateway = request.app.state.gateway
    key, job_id = gateway.key(request), request.path_params["job_id"]
    info = await gateway.owned(key, job_id)
    return _JobJSON(await gateway.job_object(job_id, info, key, token=True))


async def cancel_job(request: Request) -> Response:
    """``POST /v1/jobs/{id}/cancel``: idempotent; the job as it is now."""
    gateway: Gateway = request.app.state.gateway
    key, job_id = gateway.key(request), request.path_params["job_id"]
    await gateway.owned(key, job_id)
    await gateway.store.cancel(job_id)
    info = await gateway.owned(key, job_id)
    return _JobJSON(await gateway.job_object(job_id, info, key))


async def job_events(request: Request) -> Response:
    """``GET /v1/jobs/{id}/events``: server-sent events with ids, resumable."""
    gateway: Gateway = request.app.state.gateway
    job_id = request.path_params["job_id"]
    token = request.query_params.get("token")
    info = await gateway.store.info(job_id)
    owner = info.get(Field.OWNER, "")
    if token is not None:  # a browser's EventSource cannot send a header
        if not info or not await gateway.token_valid(token, job_id, owner):
            raise GatewayError(404, f"no job {job_id!r}", param="id", code="job_not_found")
    else:
        await gateway.owned(gateway.key(request), job_id)
    after = request.headers.get("last-event-id") or request.query_params.get("after") or "0-0"
    if not _is_entry_id(after):
        raise GatewayError(400, "Last-Event-ID / after must be a stream id like 1-5",
                           param="after", code="invalid_event_id")
    job = AsyncJob(gateway.store, job_id)

    async def body() -> AsyncIterator[bytes]:
        yield _RETRY
        frames: list[bytes] = []  # what one read brought, sent as one write
        try:
            async for event in job.events(after=after, idle=gateway.settings.gateway.keepalive,
                                          batched=True):
                if event is IDLE:
                    yield b": keep-alive\n\n"
                elif event is BATCH_END:
                    yield b"".join(frames)
                    frames.clear()
                else:
                    entry = event.pop("id")
                    frames.append(b"id: " + entry.encode() + b"\ndata: " + orjson.dumps(event)
                                  + b"\n\n")
            yield b"".join(frames)
        except EventsGone:
            pass  # nothing after ``after``: it ended, and its final event was read or expired
        except (BrokerUnavailable, redis.RedisError):
            pass  # the headers are sent: closing is all that is left; the reader resumes

    return StreamingResponse(body(), media_type="text/event-stream", headers=_SSE_HEADERS)


_ENTRY_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})", re.ASCII)


def _is_entry_id(value: str) -> bool:
    match = _ENTRY_ID.fullmatch(value)
    return match is not None and all(int(part) < 2**64 for part in match.groups())


# the playground

def _playground() -> tuple[str, dict[str, str]]:
    """The page at ``/`` and its headers: a policy that runs its own script, nothing else."""
    page = importlib.resources.files("api_tasks.gateway").joinpath("playground.html").read_text()
    script = page.split("<script>", 1)[1].split("</script>", 1)[0]
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    policy = (f"default-src 'self'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; "
              "img-src 'self' data:; "
              "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
    return page, {"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff",
                  "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


# health

async def healthz(request: Request) -> Response:
    """The process answers."""
    return JSONResponse({"status": "ok"})


async def metrics_page(request: Request) -> Response:
    """This process's Prometheus metrics, with the cluster's gauges read from Redis."""
    body, content_type = await anyio.to_thread.run_sync(metrics.exposition)
    return Response(body, media_type=content_type)


async def readyz(request: Request) -> Response:
    """Ready: Redis answers and at least one worker renewed its liveness record lately (read
    from those records: no broadcast to the workers)."""
    gateway: Gateway = request.app.state.gateway
    try:
        workers = await gateway.store.shell.run(alive(gateway.keys))
        if gateway.broker is not gateway.redis:  # the broker's Redis must answer too
            await gateway.broker.ping()
    except UNAVAILABLE as err:
        return JSONResponse({"status": "unavailable", "redis": f"unavailable: {reason(err)}",
                             "workers": []}, status_code=503, headers={"Retry-After": "1"})
    ready = bool(workers)
    return JSONResponse({"status": "ready" if ready else "no_workers", "redis": "ok",
                         "workers": workers}, status_code=200 if ready else 503)


_UNAVAILABLE_OR_SAID: tuple[type[Exception], ...] = (*UNAVAILABLE, BrokerUnavailable)


@contextlib.contextmanager
def _redis_errors() -> Any:
    try:
        yield
    except _UNAVAILABLE_OR_SAID as err:
        raise unavailable(err) from None


def _with(response: Response, headers: dict[str, str]) -> Response:
    response.headers.update(headers)
    return response


async def _gateway_error(request: Request, err: Exception) -> Response:
    assert isinstance(err, GatewayError)
    return err.response()


async def _redis_down(request: Request, err: Exception) -> Response:
    return unavailable(err).response()


async def _internal(request: Request, err: Exception) -> Response:
    log.error("gateway: %s %s failed", request.method, request.url.path, exc_info=err)
    return openai_error(500, "internal error in the gateway", type="server_error",
                        code="internal_error")


def create_app(settings: Settings) -> Starlette:
    """The gateway app for these settings."""
    gateway = Gateway(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        yield
        await gateway.close()

    page, page_headers = _playground()

    async def playground(request: Request) -> Response:
        """``GET /``: the playground page."""
        return Response(page, media_type="text/html; charset=utf-8", headers=page_headers)

    routes = [
        Route("/", playground, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/responses", responses, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/jobs", create_job, methods=["POST"]),
        Route("/v1/jobs", list_jobs, methods=["GET"]),
        Route("/v1/jobs/{job_id}", get_job, methods=["GET"]),
        Route("/v1/jobs/{job_id}/cancel", cancel_job, methods=["POST"]),
        Route("/v1/jobs/{job_id}/events", job_events, methods=["GET"]),
        Route("/v1/files", upload_file, methods=["POST"]),
        Route("/v1/files", list_files, methods=["GET"]),
        Route("/v1/files/{file_id}", get_file, methods=["GET"]),
        Route("/v1/files/{file_id}", delete_file, methods=["DELETE"]),
        Route("/v1/files/{file_id}/content", file_content, methods=["GET"]),
        Route("/v1/batches", create_batch, methods=["POST"]),
        Route("/v1/batches", list_batches, methods=["GET"]),
        Route("/v1/batches/{batch_id}", get_batch, methods=["GET"]),
        Route("/v1/batches/{batch_id}/cancel", cancel_batch, methods=["POST"]),
        Route("/v1/webhooks/deliveries", list_deliveries, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics_page, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        GatewayError: _gateway_error, BrokerUnavailable: _redis_down,
        redis.ConnectionError: _redis_down, redis.TimeoutError: _redis_down,
        redis.RedisError: _redis_down, Exception: _internal,
        404: lambda request, err: openai_error(404, f"no route {request.url.path}",
                                               type="invalid_request_error", code="not_found"),
        405: lambda request, err: openai_error(405, "method not allowed",
                                               type="invalid_request_error"),
    })
    app.state.gateway = gateway
    return app
