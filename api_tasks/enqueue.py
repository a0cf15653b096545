"""Putting a job on the queue: validate, record, send. What producers and workers share.

``Client`` (the producer API) is an ``Enqueuer`` that also hands back ``Job``s;
the workers' batch pump sends batch lines through a bare one.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import redis
from kombu.exceptions import OperationalError

from api_tasks.broker import HIDDEN_ARGS, create_app
from api_tasks.connections import connect
from api_tasks.errors import BrokerUnavailable
from api_tasks.record.job_record import submit_fields
from api_tasks.record.keys import Keys
from api_tasks.record.store import JobStore
from api_tasks.spec import TASK_NAMES, Kind, build_spec
from api_tasks.upstream.routing import resolve_upstream

if TYPE_CHECKING:
    from celery import Celery

    from config.settings import Settings

__all__ = ["PRODUCER_POOL", "Enqueuer"]

_QUICK_TIMEOUT = 5.0
PRODUCER_POOL = 10_000  # a producer's pools: readers waiting on streams each hold one


class Enqueuer:
    """Validates, records and sends jobs, under one Redis pool and one Celery app."""

    def __init__(self, settings: Settings, app: Celery | None = None) -> None:
        self.settings = settings
        # quick calls fail fast on a hung Redis (redis-py 8 caps a pool at 100 by default)
        self.redis = connect(settings.redis, socket_timeout=_QUICK_TIMEOUT,
                             max_connections=PRODUCER_POOL)
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
                    self._app = create_app(self.settings)
        return self._app

    def warm(self) -> None:
        """Connect and declare the queues now, so that the first submit is as quick as the
        next (the first one costs tens of milliseconds otherwise)."""
        try:
            self.redis.ping()
            with self.app.producer_or_acquire() as producer:
                for queue in self.app.amqp.queues.values():
                    producer.maybe_declare(queue)
        except (redis.RedisError, OperationalError) as err:
            raise BrokerUnavailable(f"Redis is unavailable: {err}") from err

    def enqueue(self, kind: Kind, first: Any, params: Mapping[str, Any], *,
                job_id: str | None = None, fields: Mapping[str, str] | None = None) -> str:
        """Validate, record and send a job; its id (``InvalidJob`` names a bad field).

        ``job_id`` fixes the id (a batch line's): enqueued again, the record is kept
        and the second message is a duplicate the workers drop, not a second call.
        ``fields`` go into the job record.
        """
        spec = build_spec(kind, first, params, self.settings.jobs.max_request_bytes)
        upstream = resolve_upstream(self.settings, spec)
        queue = spec.queue or self.settings.jobs.default_queue
        job_id = job_id or str(uuid.uuid4())
        record = {**submit_fields(spec, upstream.name, queue), **(fields or {})}
        created = False
        try:
            created = self.store.create(job_id, record)
            self.app.send_task(TASK_NAMES[kind], args=[first], kwargs=spec.task_kwargs(),
                               task_id=job_id, queue=queue, **HIDDEN_ARGS)
        except BaseException as err:
            if created:  # not sent, whatever the reason: no record may wait for a message
                with contextlib.suppress(redis.RedisError):
                    self.store.forget(job_id)
            if isinstance(err, (redis.ConnectionError, redis.TimeoutError, OperationalError)):
                raise BrokerUnavailable(
                    f"Redis is unavailable, job not submitted: {err}") from err
            raise
        return job_id
