"""api_tasks: OpenAI-format chat and completion jobs on Celery and Redis.

Producer API::

    from api_tasks import submit_chat
    job = submit_chat([{"role": "user", "content": "Hello"}], model="gpt-4o-mini")
    print(job.result(timeout=60)["choices"][0]["message"]["content"])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from api_tasks.batches import Batch, BatchStatus
from api_tasks.client import Client, DryRun, default_client
from api_tasks.errors import (
    APIConnectionError,
    APIStatusError,
    ApiTasksError,
    APITimeoutError,
    BatchNotFound,
    BrokerUnavailable,
    ConfigError,
    InvalidBatch,
    InvalidJob,
    InvalidResponseError,
    JobCancelled,
    JobFailed,
    JobNotFound,
    JobTimeout,
    StreamError,
    StreamRestarted,
    UpstreamError,
)
from api_tasks.events import EventType, JobStatus
from api_tasks.jobs import Job
from api_tasks.merge import merge_payload
from api_tasks.spec import Kind

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "ApiTasksError",
    "Batch",
    "BatchNotFound",
    "BatchStatus",
    "BrokerUnavailable",
    "Client",
    "ConfigError",
    "DryRun",
    "EventType",
    "InvalidBatch",
    "InvalidJob",
    "InvalidResponseError",
    "Job",
    "JobCancelled",
    "JobFailed",
    "JobNotFound",
    "JobStatus",
    "JobTimeout",
    "StreamError",
    "StreamRestarted",
    "UpstreamError",
    "dry_run",
    "get_batch",
    "get_job",
    "merge_payload",
    "submit_batch",
    "submit_chat",
    "submit_completion",
]


def submit_chat(messages: Any, **params: Any) -> Job:
    """Enqueue a chat job (``model``, ``stream``, ``upstream``, any OpenAI field)."""
    return default_client().submit_chat(messages, **params)


def submit_completion(prompt: Any, **params: Any) -> Job:
    """Enqueue a completion job; returns at once."""
    return default_client().submit_completion(prompt, **params)


def dry_run(kind: Kind, first: Any, **params: Any) -> DryRun:
    """The upstream, URL and JSON body a ``chat`` or ``completion`` job would send; nothing
    is enqueued."""
    return default_client().dry_run(kind, first, params)


def get_job(job_id: str) -> Job:
    """Find a submitted job by id (``JobNotFound`` if none)."""
    return default_client().get_job(job_id)


def submit_batch(source: str | Path, *, window: int = 200, queue: str = "bulk") -> Batch:
    """Hand an OpenAI Batch-format JSONL file to the workers; returns at once."""
    return default_client().submit_batch(source, window=window, queue=queue)


def get_batch(batch_id: str) -> Batch:
    """Find a detached batch by id (``BatchNotFound`` if none)."""
    return default_client().get_batch(batch_id)
