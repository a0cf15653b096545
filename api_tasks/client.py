"""The producer API: submit jobs and batches, find them again, preview a job.

``Client`` is an ``Enqueuer`` (one Redis pool; no Celery app: it sends task messages
itself) that hands back
``Job`` and ``Batch`` handles; the module-level functions here (re-exported by
``api_tasks``) use a default client built from the environment on first use.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from api_tasks.batches.detached import Batch, upload_batch
from api_tasks.connections import connect
from api_tasks.enqueue import PRODUCER_POOL, Enqueuer
from api_tasks.record.reader import Job
from api_tasks.record.store import JobStore
from api_tasks.record.webhooks import job_notifier
from api_tasks.spec import Kind, build_spec
from api_tasks.upstream.routing import build_call, resolve_upstream

if TYPE_CHECKING:
    from config.settings import Settings

__all__ = ["Client", "DryRun", "default_client", "dry_run", "get_batch", "get_job",
           "submit_batch", "submit_chat", "submit_completion", "submit_embeddings",
           "submit_response"]


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


class Client(Enqueuer):
    """Submits jobs and finds them again."""

    def __init__(self, settings: Settings | None = None) -> None:
        if settings is None:
            from config.loader import load_settings

            settings = load_settings()
        super().__init__(settings)
        # blocking reads (XREAD BLOCK) get their own pool, with a longer timeout
        self.store = JobStore(self.redis, self.keys, settings.jobs.result_ttl,
                              settings.jobs.queued_ttl,
                              blocking=connect(settings.redis.state(),
                                               max_connections=PRODUCER_POOL),
                              notifier=job_notifier(self.keys, settings))

    def submit_chat(self, messages: Any, **params: Any) -> Job:
        """Enqueue a chat completion job; returns at once."""
        return self.submit(Kind.CHAT, messages, params)

    def submit_completion(self, prompt: Any, **params: Any) -> Job:
        """Enqueue a completion job; returns at once."""
        return self.submit(Kind.COMPLETION, prompt, params)

    def submit_embeddings(self, input: Any, **params: Any) -> Job:
        """Enqueue an embeddings job (never streamed); returns at once."""
        return self.submit(Kind.EMBEDDING, input, params)

    def submit_response(self, input: Any, **params: Any) -> Job:
        """Enqueue a responses job (for upstreams whose ``endpoints`` list /v1/responses)."""
        return self.submit(Kind.RESPONSE, input, params)

    def submit(self, kind: Kind, first: Any, params: Mapping[str, Any], *,
               job_id: str | None = None, fields: Mapping[str, str] | None = None) -> Job:
        """Validate, record and enqueue a job (``InvalidJob`` names a bad field); see
        ``Enqueuer.enqueue`` for ``job_id`` and ``fields``."""
        return Job(self, self.enqueue(kind, first, params, job_id=job_id, fields=fields),
                   short=not params.get("stream"))

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
        return upload_batch(self, Path(source), window=window, queue=queue)

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


def submit_chat(messages: Any, **params: Any) -> Job:
    """Enqueue a chat job (``model``, ``stream``, ``upstream``, any OpenAI field)."""
    return default_client().submit_chat(messages, **params)


def submit_completion(prompt: Any, **params: Any) -> Job:
    """Enqueue a completion job; returns at once."""
    return default_client().submit_completion(prompt, **params)


def submit_embeddings(input: Any, **params: Any) -> Job:
    """Enqueue an embeddings job; returns at once."""
    return default_client().submit_embeddings(input, **params)


def submit_response(input: Any, **params: Any) -> Job:
    """Enqueue a responses job; returns at once."""
    return default_client().submit_response(input, **params)


def dry_run(kind: Kind, first: Any, **params: Any) -> DryRun:
    """The upstream, URL and JSON body a job of this kind would send; nothing is enqueued."""
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
