"""api_tasks: OpenAI-format chat, completion, embeddings and responses jobs on Celery and Redis.

Producer API::

    from api_tasks import submit_chat
    job = submit_chat([{"role": "user", "content": "Hello"}], model="gpt-4o-mini")
    print(job.result(timeout=60)["choices"][0]["message"]["content"])

The names below are loaded on first use, so importing one module of the package
(``api_tasks.stream.sse``, say) loads that module and what it imports, nothing more.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from api_tasks.batches.detached import Batch
    from api_tasks.batches.state import BatchStatus
    from api_tasks.client import (
        Client,
        DryRun,
        default_client,
        dry_run,
        get_batch,
        get_job,
        submit_batch,
        submit_chat,
        submit_completion,
        submit_embeddings,
        submit_response,
    )
    from api_tasks.errors import (
        APIConnectionError,
        APIStatusError,
        ApiTasksError,
        APITimeoutError,
        BatchNotFound,
        BrokerUnavailable,
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
    from api_tasks.record.events import EventType
    from api_tasks.record.job_record import JobStatus
    from api_tasks.record.reader import Job
    from api_tasks.spec import Kind
    from api_tasks.upstream.merge import merge_payload
    from config.errors import ConfigError

# where each public name lives
_EXPORTS = {
    "Batch": "api_tasks.batches.detached",
    "BatchStatus": "api_tasks.batches.state",
    **dict.fromkeys(("Client", "DryRun", "default_client", "dry_run", "get_batch", "get_job",
                     "submit_batch", "submit_chat", "submit_completion", "submit_embeddings",
                     "submit_response"), "api_tasks.client"),
    **dict.fromkeys(("APIConnectionError", "APIStatusError", "APITimeoutError", "ApiTasksError",
                     "BatchNotFound", "BrokerUnavailable", "InvalidBatch",
                     "InvalidJob", "InvalidResponseError", "JobCancelled", "JobFailed",
                     "JobNotFound", "JobTimeout", "StreamError", "StreamRestarted",
                     "UpstreamError"), "api_tasks.errors"),
    "EventType": "api_tasks.record.events",
    "Kind": "api_tasks.spec",
    "JobStatus": "api_tasks.record.job_record",
    "ConfigError": "config.errors",  # the settings' error, from the layer below
    "Job": "api_tasks.record.reader",
    "merge_payload": "api_tasks.upstream.merge",
}

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
    "Kind",
    "StreamError",
    "StreamRestarted",
    "UpstreamError",
    "default_client",
    "dry_run",
    "get_batch",
    "get_job",
    "merge_payload",
    "submit_batch",
    "submit_chat",
    "submit_completion",
    "submit_embeddings",
    "submit_response",
]


def __getattr__(name: str) -> Any:
    """Load a public name from its module on first use."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'api_tasks' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
