"""The Celery app that carries jobs, configured for long, IO-bound LLM calls.

Producers send with it and workers consume with it (``worker`` builds the worker's).

Why each setting (the README explains them for operators):
- JSON only, both ways: a pickled message is refused, never run.
- Late ack + requeue on worker loss: a job is acked only after its result is
  in Redis, so a dead worker's jobs are delivered again.
- Prefetch of one per slot: a worker reserves only what it can run, so an
  idle worker elsewhere gets the rest and interactive jobs are not stuck
  behind a reserved bulk backlog.
- Queues are read in priority order (``interactive`` before ``bulk``).
- A visibility timeout above the longest job, or Redis would hand a running
  job to a second worker.
- Celery's result backend is off: results go to our own documented keys.
- The broker's connection pool is sized from the concurrency, like the runtime's.
- Messages carry no repr of their arguments: prompts stay out of events and Flower.

Producers do not publish through kombu: ``task_message`` builds the message Celery's
``send_task`` would, so a submit sends it in the same Redis round trip as the job's record
(kombu's publish cost two more, and most of a submit's CPU).
"""

from __future__ import annotations

import base64
import functools
import os
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from celery import Celery
from celery.utils.nodenames import anon_nodename
from kombu import Exchange, Queue  # type: ignore[attr-defined]

from api_tasks.connections import pool_size, sentinel_options
from api_tasks.json_codec import dumps
from api_tasks.record.keys import Keys
from api_tasks.spec import QUEUES

if TYPE_CHECKING:
    from config.settings import Settings

__all__ = ["create_app", "task_message"]

# what Celery shows of a job's arguments in its events, Flower and logs: not the prompt
_HIDDEN = "(job)"
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


@functools.cache
def _origin(pid: int) -> str:
    return str(anon_nodename())  # "gen<pid>@<host>", as Celery's producer says (per process)


def task_message(task: str, args: list[Any], kwargs: dict[str, Any], task_id: str,
                 lane: str, headers: Mapping[str, str] | None = None) -> bytes:
    """The message ``send_task(task, args, kwargs, task_id=, queue=lane)`` puts on the lane's
    list: Celery's protocol 2 in kombu's Redis envelope (tests/api_tasks/test_broker.py holds
    the two equal)."""
    body = dumps([args, kwargs, _EMBED])
    return dumps({
        "body": base64.b64encode(body).decode("ascii"),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py", "task": task, "id": task_id, "shadow": None, "eta": None,
            "expires": None, "group": None, "group_index": None, "retries": 0,
            "timelimit": [None, None], "root_id": task_id, "parent_id": None,
            "argsrepr": _HIDDEN, "kwargsrepr": _HIDDEN, "origin": _origin(os.getpid()),
            "ignore_result": None, "replaced_task_nesting": 0, "stamped_headers": None,
            "stamps": {}, **(headers or {}),  # e.g. a trace's traceparent
        },
        "properties": {
            "correlation_id": task_id, "reply_to": "", "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": lane}, "priority": 0,
            # kombu's tag, unique per message: a worker's unacked entry is keyed by it
            "body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
        },
    })


def _broker(settings: Settings) -> tuple[str, str, dict[str, Any]]:
    """kombu's URL, transport and Sentinel options for the configured Redis."""
    where = settings.redis.sentinel
    if where is None:
        return settings.redis.url, "worker.transport:Transport", {}
    login = ""
    if where.username or where.password is not None:
        login = f"{quote(where.username or '', safe='')}:{quote(where.password or '', safe='')}@"
    host, port = where.nodes[0]  # the rest in an option (worker/transport.py says why)
    url = f"sentinel://{login}{f'[{host}]' if ':' in host else host}:{port}/{where.db}"
    return url, "worker.transport:SentinelTransport", {
        "master_name": where.master, "sentinels": [list(node) for node in where.nodes],
        "sentinel_kwargs": sentinel_options(settings.redis, where)}


def create_app(settings: Settings) -> Celery:
    """A Celery app for these settings (used by workers and producers alike)."""
    url, transport, options = _broker(settings)
    app = Celery("api_tasks", broker=url, include=["api_tasks.tasks"], set_as_current=False)
    app.conf.update(
        broker_transport=transport,
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=settings.jobs.default_queue,
        task_queues=[Queue(name, Exchange(name), routing_key=name) for name in QUEUES],
        task_create_missing_queues=False,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout(),
            "queue_order_strategy": "priority",
            "global_keyprefix": Keys(settings.redis.prefix).celery_prefix(),
            # every job thread acks or requeues its own message, all at once at shutdown
            "max_connections": pool_size(settings.worker.concurrency),
            # refused before decoding (worker/transport.py): no job is this large
            "max_message_bytes": settings.max_message_bytes(),
            **options,
        },
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_pool=settings.worker.pool,
        worker_concurrency=settings.worker.concurrency,
        task_send_sent_event=False,
        enable_utc=True,
    )
    return app
