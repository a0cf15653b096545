"""The producer: validate a job, record it, enqueue it, hand back a ``Job``.

``Client`` holds one Redis pool and one Celery app; the module-level
functions in ``api_tasks`` use a default client built from the environment's
settings on first use.
"""

from __future__ import annotations

import contextlib
import json
import threading
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
from kombu.exceptions import OperationalError

from api_tasks.batches import Batch, submit_batch
from api_tasks.connections import connect
from api_tasks.errors import BrokerUnavailable
from api_tasks.jobs import Job
from api_tasks.keys import Keys
from api_tasks.routing import build_call, resolve_upstream
from api_tasks.spec import TASK_NAMES, Kind, build_spec
from api_tasks.store import JobStore

if TYPE_CHECKING:
    from celery import Celery

    from config.settings import Settings

__all__ = ["Client", "DryRun", "default_client"]

_QUICK_TIMEOUT = 5.0
_MAX_CONNECTIONS = 10_000


@dataclass(frozen=True)
class DryRun:
    """The call a job would make: its upstream, queue, URL and exact JSON body."""

    upstream: str
    queue: str
    url: str
    body: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """As a JSON-ready dict."""
        return asdict(self)


class Client:
    """Submits jobs and finds them again."""

    def __init__(self, settings: Settings | None = None, app: Celery | None = None) -> None:
        if settings is None:
            from config.loader import load_settings

            settings = load_settings()
        self.settings = settings
        # quick calls fail fast on a hung Redis; blocking reads get their own, longer timeout.
        # Each reader waiting on a stream holds a connection: no small cap (redis-py 8's is 100)
        self.redis = connect(settings.redis, socket_timeout=_QUICK_TIMEOUT,
                             max_connections=_MAX_CONNECTIONS)
        self.blocking = connect(settings.redis, max_connections=_MAX_CONNECTIONS)
        self.keys = Keys(settings.redis.prefix)
        self.store = JobStore(self.redis, self.keys, settings.jobs.result_ttl,
                              settings.jobs.queued_ttl)
        self._app: Celery | None = app
        self._lock = threading.Lock()

    @property
    def app(self) -> Celery:
        """The Celery app used to send tasks (built on first use)."""
        if self._app is None:
            with self._lock:
                if self._app is None:
                    from worker.celery_app import create_app

                    self._app = create_app(self.settings)
        return self._app

    def submit_chat(self, messages: Any, **params: Any) -> Job:
        """Enqueue a chat completion job; returns at once."""
        return self.submit("chat", messages, params)

    def submit_completion(self, prompt: Any, **params: Any) -> Job:
        """Enqueue a completion job; returns at once."""
        return self.submit("completion", prompt, params)

    def submit(self, kind: Kind, first: Any, params: Mapping[str, Any], *,
               job_id: str | None = None, fields: Mapping[str, str] | None = None) -> Job:
        """Validate, record and enqueue a job (``InvalidJob`` names a bad field).

        ``job_id`` fixes the id (a batch line's): submitted again, the record is kept
        and the second message is a duplicate the workers drop, not a second call.
        ``fields`` go into the job record.
        """
        spec = build_spec(kind, first, params, self.settings.jobs.max_request_bytes)
        upstream = resolve_upstream(self.settings, spec)
        queue = spec.queue or self.settings.jobs.default_queue
        job_id = job_id or str(uuid.uuid4())
        record = {**self.store.record_fields(spec, upstream.name, queue), **(fields or {})}
        created = False
        try:
            created = self.store.create(job_id, record)
            self.app.send_task(TASK_NAMES[kind], args=[first], kwargs=spec.task_kwargs(),
                               task_id=job_id, queue=queue)
        except BaseException as err:
            if created:  # not sent, whatever the reason: no record may wait for a message
                with contextlib.suppress(redis.RedisError):
                    self.store.forget(job_id)
            if isinstance(err, (redis.ConnectionError, redis.TimeoutError, OperationalError)):
                raise BrokerUnavailable(
                    f"Redis is unavailable, job not submitted: {err}") from err
            raise
        return Job(self, job_id)

    def dry_run(self, kind: Kind, first: Any, params: Mapping[str, Any]) -> DryRun:
        """What a job would send, after every payload layer, without enqueuing anything.

        Built from this process's settings, as a worker with the same settings would;
        the upstream's key is never shown.
        """
        spec = build_spec(kind, first, params, self.settings.jobs.max_request_bytes)
        upstream = resolve_upstream(self.settings, spec)
        call = build_call(self.settings, upstream, spec)
        return DryRun(upstream.name, spec.queue or self.settings.jobs.default_queue, call.url,
                      json.loads(call.body))

    def submit_batch(self, source: str | Path, *, window: int = 200,
                     queue: str = "bulk") -> Batch:
        """Check an OpenAI Batch-format file and hand it to the workers (``InvalidBatch``)."""
        return submit_batch(self, Path(source), window=window, queue=queue)

    def get_batch(self, batch_id: str) -> Batch:
        """The detached batch with this id (``BatchNotFound`` if there is none)."""
        batch = Batch(self, batch_id)
        batch.status()
        return batch

    def get_job(self, job_id: str) -> Job:
        """The job with this id (``JobNotFound`` if there is none)."""
        job = Job(self, job_id)
        job.status()
        return job

    def job(self, job_id: str) -> Job:
        """A handle on a job id without checking that it exists."""
        return Job(self, job_id)


_default: Client | None = None
_default_lock = threading.Lock()


def default_client() -> Client:
    """The process-wide client built from the environment's settings."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Client()
    return _default
