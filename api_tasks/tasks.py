"""The Celery tasks, one per kind of job. Thin: decode arguments, run the job, declare the
retry policy.

Retries of the upstream call happen inside ``JobRunner`` (``api_tasks.upstream.retry``),
so the tasks never ask Celery to retry. A job that cannot finish in this
process (the worker is stopping, or Redis is unreachable) is rejected with
requeue, and runs again as a new, announced attempt.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from celery import Task, shared_task
from celery.exceptions import Reject

from api_tasks.connections import reason
from api_tasks.errors import WorkerStopping
from api_tasks.runtime import current
from api_tasks.spec import ENDPOINTS, Kind

__all__ = ["chat", "completion", "embedding", "response"]

log = logging.getLogger(__name__)

_OPTIONS: dict[str, Any] = {
    "bind": True,
    "ignore_result": True,  # results go to our own keys, not Celery's backend
    "acks_late": True,  # a job whose worker dies is delivered again
    "reject_on_worker_lost": True,
    "max_retries": 0,  # the retry policy lives in api_tasks.upstream.retry, not here
}


def _run(task: Task, kind: Kind, first: Any, params: dict[str, Any]) -> str:
    runtime = current()
    job_id = task.request.id
    try:
        try:
            return runtime.runner.run(job_id, kind, first, params,
                                      getattr(task.request, "traceparent", None),
                                      str((task.request.properties or {}).get(
                                          "delivery_tag") or ""))
        except WorkerStopping:  # the runner gave the job back; the broker gets it again
            raise Reject("worker shutting down", requeue=True) from None
        except (redis.RedisError, TimeoutError, Reject):
            raise
        except Exception as err:
            log.exception("job %s: unexpected error", job_id)
            return runtime.runner.fail(job_id, kind, err)
    except (redis.RedisError, TimeoutError) as err:
        log.error("job %s: Redis unavailable (%s); requeueing", job_id, reason(err))
        time.sleep(1.0)  # a Redis that refuses writes must not become a hot requeue loop
        raise Reject("Redis unavailable", requeue=True) from None


@shared_task(name=ENDPOINTS[Kind.CHAT].task, **_OPTIONS)
def chat(self: Task, messages: Any = None, **params: Any) -> str:
    """Run a chat completion job: ``messages`` plus any OpenAI fields."""
    return _run(self, Kind.CHAT, messages, params)


@shared_task(name=ENDPOINTS[Kind.COMPLETION].task, **_OPTIONS)
def completion(self: Task, prompt: Any = None, **params: Any) -> str:
    """Run a completion job: ``prompt`` plus any OpenAI fields."""
    return _run(self, Kind.COMPLETION, prompt, params)


@shared_task(name=ENDPOINTS[Kind.EMBEDDING].task, **_OPTIONS)
def embedding(self: Task, input: Any = None, **params: Any) -> str:
    """Run an embeddings job: ``input`` plus any OpenAI fields."""
    return _run(self, Kind.EMBEDDING, input, params)


@shared_task(name=ENDPOINTS[Kind.RESPONSE].task, **_OPTIONS)
def response(self: Task, input: Any = None, **params: Any) -> str:
    """Run a responses job: ``input`` plus any OpenAI fields."""
    return _run(self, Kind.RESPONSE, input, params)
