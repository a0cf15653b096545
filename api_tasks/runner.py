"""Run one job: claim it, call the upstream with retries, publish, finish once.

Plain code, testable without Celery: the task only decodes its arguments and
calls ``JobRunner.run``. Every way a job can end goes through ``_finish``,
which writes the status, the result envelope and the final event together.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import requests

from api_tasks.assemble import StreamAssembler
from api_tasks.errors import (
    APIConnectionError,
    ApiTasksError,
    CallCancelled,
    InvalidJob,
    InvalidResponseError,
    StreamError,
    UpstreamError,
    error_object,
)
from api_tasks.events import TERMINAL, JobStatus, chunk_event, entry_id, final_event
from api_tasks.http_client import CallRequest, HttpClient
from api_tasks.inflight import CallHandle, Watchdog
from api_tasks.retry import RetryPolicy, retry_delay
from api_tasks.routing import build_call, resolve_upstream
from api_tasks.spec import JobSpec, Kind, build_spec
from api_tasks.sse import SSEDecoder, SSEEvent
from api_tasks.store import JobStore, envelope
from api_tasks.writer import Command, EventWriter

if TYPE_CHECKING:
    from config.settings import Settings, Upstream

__all__ = ["JobRunner", "WorkerStopping"]

log = logging.getLogger(__name__)


class WorkerStopping(ApiTasksError):
    """The worker is shutting down mid-call: the job must go back to the queue."""


@dataclass
class _Run:
    """One delivery of one job."""

    job_id: str
    spec: JobSpec
    upstream: Upstream | None  # None only for a job refused before routing
    delivery: int
    created_at: float
    started_at: float = field(default_factory=time.time)
    attempts: int = 0
    published: int = 0

    @property
    def target(self) -> Upstream:
        """The upstream of a routed job."""
        assert self.upstream is not None, "only a routed job is called"
        return self.upstream


class JobRunner:
    """Executes jobs in this process; shared by all worker threads."""

    def __init__(self, settings: Settings, store: JobStore, writer: EventWriter,
                 watchdog: Watchdog, http: HttpClient) -> None:
        self.settings = settings
        self.store = store
        self.writer = writer
        self.watchdog = watchdog
        self.http = http
        self.policies = {u.name: RetryPolicy(**u.retry.model_dump()) for u in settings.upstreams}

    def run(self, job_id: str, kind: Kind, first: Any, params: dict[str, Any]) -> str:
        """Run a job to its end; return its final status."""
        try:
            spec = build_spec(kind, first, params, self.settings.jobs.max_request_bytes)
            upstream = resolve_upstream(self.settings, spec)
        except InvalidJob as err:
            return self._reject(job_id, kind, err)
        queue = spec.queue or self.settings.jobs.default_queue
        claim = self.store.claim(job_id, self.store.record_fields(spec, upstream.name, queue))
        if claim.verdict in TERMINAL:
            log.info("job %s already %s: delivery ignored", job_id, claim.verdict)
            return claim.verdict
        run = _Run(job_id, spec, upstream, claim.delivery, claim.created_at)
        if claim.verdict == "cancel":
            return self._finish(run, JobStatus.CANCELLED, error=CallCancelled(
                "the job was cancelled before it started").to_error())
        return self._execute(run)

    def _execute(self, run: _Run) -> str:
        handle = CallHandle(run.job_id)
        with self.watchdog.watching(handle):
            try:
                response = self._call_with_retries(run, handle)
            except UpstreamError as err:
                if handle.reason == "shutdown":
                    raise WorkerStopping(run.job_id) from err
                status = JobStatus.CANCELLED if isinstance(err, CallCancelled) else JobStatus.FAILED
                return self._finish(run, status, error=err.to_error(
                    attempts=run.attempts, upstream=run.target.name))
        return self._finish(run, JobStatus.SUCCEEDED, response=response)

    def _call_with_retries(self, run: _Run, handle: CallHandle) -> dict[str, Any]:
        call = build_call(self.settings, run.target, run.spec)
        policy = self.policies[run.target.name]
        while True:
            run.attempts += 1
            handle.start_attempt(run.target.timeouts.total)
            try:
                return self._attempt(run, handle, call)
            except UpstreamError as err:
                delay = retry_delay(policy, err, run.attempts, random.random(), run.published)
                if delay is None or handle.reason in ("cancelled", "shutdown"):
                    raise
                log.info("job %s attempt %d failed (%s: %s); retrying in %.2fs",
                         run.job_id, run.attempts, err.code, err.message, delay)
                handle.pause()
                if handle.wait(delay):
                    raise handle.error() or err from err

    def _attempt(self, run: _Run, handle: CallHandle, call: CallRequest) -> dict[str, Any]:
        response = self.http.send(handle, call)
        content_type = response.headers.get("content-type", "")
        if run.spec.stream and content_type.startswith("text/event-stream"):
            return self._stream(run, handle, response, call)
        data = self.http.read_json(handle, response, call)
        if not isinstance(data.get("choices"), list):
            raise InvalidResponseError("upstream response has no 'choices' list",
                                       code="invalid_response", status=response.status_code)
        return data

    def _stream(self, run: _Run, handle: CallHandle, response: requests.Response,
                call: CallRequest) -> dict[str, Any]:
        decoder = SSEDecoder(run.target.max_line_bytes)
        assembler = StreamAssembler(run.spec.kind)
        done = False
        try:
            with response:
                for data in self.http.reads(handle, response, call, call.max_response_bytes):
                    done = self._publish(run, assembler, decoder.feed(data))
                    if done:
                        break
                else:
                    done = self._publish(run, assembler, decoder.close())
        except APIConnectionError:
            # before any chunk the call may be retried; after, it is a truncated stream
            # (or, past the last finish_reason, a cut that lost nothing)
            if run.published == 0:
                raise
        if not done and not assembler.finished:
            raise StreamError(f"the upstream closed the stream after {run.published} chunks "
                              "without a finish_reason or [DONE]", code="stream_truncated",
                              status=response.status_code)
        return assembler.response()

    def _publish(self, run: _Run, assembler: StreamAssembler, events: list[SSEEvent]) -> bool:
        """Parse and publish a batch of events (one pipeline); True once [DONE] is seen."""
        keys = self.store.keys
        stream_key, channel = keys.events(run.job_id), keys.channel(run.job_id)
        commands: list[Command] = []
        done = False
        for event in events:
            if event.data == "[DONE]":
                done = True
                break
            assembler.add(_parse_chunk(event))
            payload = chunk_event(run.published, run.delivery, event.data)
            commands.append(("XADD", stream_key, entry_id(run.delivery, run.published),
                             "event", payload))
            commands.append(("PUBLISH", channel, payload))
            if run.published == 0:
                commands.append(("EXPIRE", stream_key, self._ttl(run.spec)))
            run.published += 1
        if commands:
            self.writer.submit(commands)
        return done

    def _reject(self, job_id: str, kind: str, err: InvalidJob) -> str:
        log.warning("job %s refused: %s", job_id, err)
        claim = self.store.claim(job_id, {"kind": kind, "store_result": "1"})
        if claim.verdict in TERMINAL:
            return claim.verdict
        spec = JobSpec(kind="chat" if kind == "chat" else "completion", body={})
        run = _Run(job_id, spec, None, claim.delivery, claim.created_at)
        return self._finish(run, JobStatus.FAILED, error={**err.to_error(), "attempts": 0})

    def _finish(self, run: _Run, status: JobStatus, *, response: dict[str, Any] | None = None,
                error: dict[str, Any] | None = None) -> str:
        finished = time.time()
        meta: dict[str, Any] = {
            "kind": run.spec.kind, "upstream": run.upstream.name if run.upstream else None,
            "model": run.spec.model, "attempts": run.attempts, "created_at": run.created_at,
            "started_at": run.started_at, "finished_at": finished}
        result = envelope(run.job_id, status, meta, response=response, error=error) \
            if run.spec.store_result else None
        event = final_event(status, run.published, run.delivery, error=error,
                            **_summary(response))
        self.writer.write(self.store.finish_commands(
            run.job_id, status, result, event, entry_id(run.delivery, run.published),
            self._ttl(run.spec), run.attempts, error))
        log.info("job %s %s (upstream=%s attempts=%d chunks=%d %.3fs)",
                 run.job_id, status.value, meta["upstream"], run.attempts, run.published,
                 finished - run.started_at)
        return status.value

    def _ttl(self, spec: JobSpec) -> int:
        return spec.result_ttl or self.settings.jobs.result_ttl

    def fail_unexpected(self, job_id: str, kind: str, err: BaseException) -> str:
        """Last resort for a bug: the job ends failed with an internal_error, never hangs."""
        error = error_object("internal_error", "internal_error",
                             f"the worker hit an unexpected {type(err).__name__}", None)
        spec = JobSpec(kind="chat" if kind == "chat" else "completion", body={})
        run = _Run(job_id, spec, None, 1, time.time())
        return self._finish(run, JobStatus.FAILED, error=error)


def _parse_chunk(event: SSEEvent) -> dict[str, Any]:
    try:
        chunk = json.loads(event.data)
    except ValueError as err:
        raise InvalidResponseError(f"upstream sent an event that is not JSON: "
                                   f"{event.data[:120]!r}", code="invalid_json") from err
    if event.event == "error" or (isinstance(chunk, dict) and chunk.get("error")):
        raise _stream_error(chunk)
    if not isinstance(chunk, dict):
        raise InvalidResponseError("upstream sent an event that is not a JSON object",
                                   code="invalid_json")
    return chunk


def _stream_error(chunk: Any) -> StreamError:
    error = chunk.get("error", chunk) if isinstance(chunk, dict) else chunk
    if not isinstance(error, dict):
        return StreamError(f"upstream reported an error in the stream: {str(error)[:500]}")
    code = error.get("code")
    return StreamError(str(error.get("message") or "upstream reported an error in the stream"),
                       code=str(code) if code not in (None, "") else "stream_error",
                       type=str(error.get("type") or "server_error"), status=200)


def _summary(response: dict[str, Any] | None) -> dict[str, Any]:
    if not response:
        return {}
    choices = response.get("choices") or [{}]
    return {"finish_reason": choices[0].get("finish_reason"), "usage": response.get("usage")}
