"""The job record: the fields of a job's hash and its statuses, defined once, and its views.

The hash (``Keys.job``) is written by the scripts in ``api_tasks/record/lua/``
(through ``JobStore`` and ``LeaseStore``) and read through the views here:
``job_view`` (the typed ``status --json``) and ``meta_from`` (the result
envelope's descriptive fields). Values are strings, numbers as decimal text.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from api_tasks.spec import JobSpec

__all__ = [
    "ATTEMPT_FIELDS",
    "TERMINAL",
    "Field",
    "JobStatus",
    "envelope",
    "finish_fields",
    "job_view",
    "meta_from",
    "queued",
    "submit_fields",
]


class JobStatus(StrEnum):
    """Where a job is in its life."""

    QUEUED = "queued"
    WAITING = "waiting"  # for a rate or concurrency limit, outside any worker
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class Field(StrEnum):
    """The fields of a job's hash."""

    STATUS = "status"  # a ``JobStatus``
    KIND = "kind"  # chat or completion
    UPSTREAM = "upstream"
    QUEUE = "queue"
    MODEL = "model"  # "" when the job named none
    STREAM = "stream"  # "1" or "0"
    STORE_RESULT = "store_result"  # "1" or "0"
    RESULT_TTL = "result_ttl"  # the job's own, when it set one
    BATCH = "batch"  # the detached batch the job is a line of
    OWNER = "owner"  # the gateway key that submitted it (only it may read it)
    NOTIFY = "notify"  # "1": its end goes to its owner's webhooks
    METADATA = "metadata"  # the caller's own JSON object, from the gateway's jobs API
    CREATED_AT = "created_at"  # epoch seconds
    STARTED_AT = "started_at"  # of the latest attempt
    FINISHED_AT = "finished_at"
    DELIVERIES = "deliveries"  # attempts begun (the stream's attempt number)
    ATTEMPTS = "attempts"  # HTTP calls made by the attempt that ended it
    CRASHES = "crashes"  # attempts whose worker died
    WAITING_FOR = "waiting_for"  # why a waiting job waits
    WAITING_UNTIL = "waiting_until"  # when it is sent again (epoch seconds)
    TURN_AT = "turn_at"  # the turn it reserved under its limits (ms)
    ERROR = "error"  # the error object of a failed or cancelled job, JSON
    TOKEN = "token"  # the attempt that holds it now
    ENDED_BY = "ended_by"  # the attempt that finished, parked or gave it back
    RESENT_AT = "resent_at"  # when a batch pump last sent a lost line's job again
    RESENDS = "resends"
    TURN_ON = "turn_on"  # the deployment and model its reserved turn is under, JSON
    DEPLOYMENT = "deployment"  # the deployment that served it (or was called last)
    TRIES = "tries"  # each call's deployment, model and error (the last 32), JSON
    UNCOUNTED = "uncounted"  # "1": cancelled while queued, its end in no worker's metrics yet
    CLAIMED = "claimed"  # the holding attempt's claim reply (JSON), for a claim retried
    LEASE_UNTIL = "lease_until"  # when the holding attempt's lease lapses unless renewed (ms)
    LAPSE_SEEN = "lapse_seen"  # when a sweep first saw that lease lapsed (ms): taken a lease later


# the workers' business, not the caller's: which attempt holds or ended it, what to count
ATTEMPT_FIELDS = frozenset({Field.TOKEN, Field.ENDED_BY, Field.UNCOUNTED, Field.CLAIMED,
                            Field.LEASE_UNTIL, Field.LAPSE_SEEN})


def submit_fields(spec: JobSpec, upstream: str, queue: str) -> dict[str, str]:
    """The fields written at submit (and by a worker for a job nobody recorded)."""
    fields = {Field.KIND: spec.kind, Field.UPSTREAM: upstream, Field.QUEUE: queue,
              Field.MODEL: spec.model or "", Field.STREAM: "1" if spec.stream else "0",
              Field.STORE_RESULT: "1" if spec.store_result else "0"}
    if spec.result_ttl is not None:
        fields[Field.RESULT_TTL] = str(spec.result_ttl)
    if spec.owner is not None:
        fields[Field.OWNER] = spec.owner
    if spec.notify:
        fields[Field.NOTIFY] = "1"
    return {str(name): value for name, value in fields.items()}


def queued(fields: Mapping[str, str]) -> dict[str, str]:
    """The record of a job just submitted: its fields, status queued, created now."""
    return {**fields, Field.STATUS.value: JobStatus.QUEUED.value,
            Field.CREATED_AT.value: repr(time.time())}


def finish_fields(status: JobStatus, finished_at: float, calls: int,
                  error: dict[str, Any] | None, deployment: str | None = None,
                  tries: list[dict[str, Any]] | None = None) -> list[str]:
    """The field/value pairs written when a job ends (``LeaseStore.finish_command``)."""
    fields = [Field.STATUS, status.value, Field.FINISHED_AT, repr(finished_at),
              Field.ATTEMPTS, str(calls)]
    if error is not None:
        fields += [Field.ERROR, json.dumps(error)]
    if deployment is not None:
        fields += [Field.DEPLOYMENT, deployment]
    if tries:
        fields += [Field.TRIES, json.dumps(tries, separators=(",", ":"))]
    return [str(item) for item in fields]


def envelope(job_id: str, status: JobStatus, meta: dict[str, Any], *,
             response: Any = None, error: Any = None) -> str:
    """The result key's JSON envelope."""
    return json.dumps({"id": job_id, "status": status.value, "response": response,
                       "error": error, **meta}, separators=(",", ":"))


def _number(info: dict[str, str], name: Field) -> float | None:
    return float(info[name]) if info.get(name) else None


def meta_from(info: dict[str, str]) -> dict[str, Any]:
    """Envelope fields from a job record."""
    return {"kind": info.get(Field.KIND), "upstream": info.get(Field.UPSTREAM),
            "model": info.get(Field.MODEL) or None,
            "deployment": info.get(Field.DEPLOYMENT) or None,
            "attempts": int(info.get(Field.ATTEMPTS) or 0),
            "tries": json.loads(info[Field.TRIES]) if info.get(Field.TRIES) else [],
            "created_at": _number(info, Field.CREATED_AT),
            "started_at": _number(info, Field.STARTED_AT),
            "finished_at": _number(info, Field.FINISHED_AT)}


def job_view(job_id: str, info: dict[str, str]) -> dict[str, Any]:
    """A job record as typed, documented JSON (the README's "Job status" lists the fields)."""
    status = info.get(Field.STATUS)
    waiting = status == JobStatus.WAITING
    ended = status in TERMINAL
    return {
        "id": job_id, "status": status, "kind": info.get(Field.KIND),
        "model": info.get(Field.MODEL) or None, "upstream": info.get(Field.UPSTREAM) or None,
        "deployment": info.get(Field.DEPLOYMENT) or None,
        "queue": info.get(Field.QUEUE) or None, "stream": info.get(Field.STREAM) == "1",
        "created_at": _number(info, Field.CREATED_AT),
        "started_at": _number(info, Field.STARTED_AT),
        "finished_at": _number(info, Field.FINISHED_AT),
        "attempt": int(info.get(Field.DELIVERIES) or 0),
        "calls": int(info.get(Field.ATTEMPTS) or 0) if ended else None,
        "crashes": int(info.get(Field.CRASHES) or 0),
        "waiting_for": info.get(Field.WAITING_FOR) if waiting else None,
        "waiting_until": _number(info, Field.WAITING_UNTIL) if waiting else None,
        "batch": info.get(Field.BATCH) or None,
        "error": json.loads(info[Field.ERROR]) if info.get(Field.ERROR) else None,
        "tries": json.loads(info[Field.TRIES]) if info.get(Field.TRIES) else [],
    }

