"""A job's record in Redis, as producers see it: created at submit, read, cancelled.

The worker's side (claim, lease, finish) is ``api_tasks.record.leases``. State changes
that must not race are Lua scripts, so they hold across any number of
processes and machines. Every key written here gets a TTL.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from api_tasks.connections import text
from api_tasks.record.events import EVENT_FIELD, TERMINAL, JobStatus, final_event
from api_tasks.record.keys import Keys
from api_tasks.record.scripts import script
from api_tasks.spec import JobSpec

__all__ = ["JobStore", "envelope", "job_view", "meta_from"]

_CANCEL = script("job_cancel")
_CREATE = script("job_create")
_FORGET = script("job_forget")
_DISCARD = script("job_discard")


def envelope(job_id: str, status: JobStatus, meta: dict[str, Any], *,
             response: Any = None, error: Any = None) -> str:
    """The result key's JSON envelope."""
    return json.dumps({"id": job_id, "status": status.value, "response": response,
                       "error": error, **meta}, separators=(",", ":"))


class JobStore:
    """Reads and writes job records under one key prefix."""

    def __init__(self, client: redis.Redis, keys: Keys, result_ttl: int,
                 queued_ttl: int) -> None:
        self.redis = client
        self.keys = keys
        self.result_ttl = result_ttl
        self.queued_ttl = queued_ttl
        self._cancel = client.register_script(_CANCEL)
        self._create = client.register_script(_CREATE)
        self._forget = client.register_script(_FORGET)
        self._discard = client.register_script(_DISCARD)

    def record_fields(self, spec: JobSpec, upstream: str, queue: str) -> dict[str, str]:
        """The job hash fields written at submit (and by a worker for foreign jobs)."""
        fields = {"kind": spec.kind, "upstream": upstream, "queue": queue,
                  "model": spec.model or "", "stream": "1" if spec.stream else "0",
                  "store_result": "1" if spec.store_result else "0"}
        if spec.result_ttl is not None:
            fields["result_ttl"] = str(spec.result_ttl)
        return fields

    def create(self, job_id: str, fields: dict[str, str]) -> bool:
        """Write a new job's record, status queued; False if the id already has one."""
        record = {**fields, "status": JobStatus.QUEUED.value, "created_at": repr(time.time())}
        flat = [item for pair in record.items() for item in pair]
        return bool(self._create(keys=[self.keys.job(job_id)], args=[self.queued_ttl, *flat]))

    def forget(self, job_id: str) -> bool:
        """Delete the record of a job whose message may not have been sent, unless a worker
        has seen it already (the send did go out); True if deleted."""
        return bool(self._forget(keys=[self.keys.job(job_id)]))

    def discard(self, job_id: str) -> bool:
        """Delete an ended job's record, result and stream (its id may run again); False
        if it has not ended."""
        keys = self.keys
        return bool(self._discard(keys=[keys.job(job_id), keys.result(job_id),
                                        keys.events(job_id), keys.cancel(job_id)]))

    def cancel(self, job_id: str, *, queued_only: bool = False) -> str:
        """Ask a job to stop: 'cancelled', 'cancelling', 'missing' or its final status.

        With ``queued_only`` a running job is left to finish ('running').
        """
        meta = self.meta(job_id)
        error = {"type": "cancelled", "code": "cancelled", "status": None, "param": None,
                 "message": "the job was cancelled before it started"}
        result = envelope(job_id, JobStatus.CANCELLED, meta, error=error)
        event = final_event(JobStatus.CANCELLED, 0, 0, error=error)
        keys = self.keys
        verdict = self._cancel(
            keys=[keys.job(job_id), keys.cancel(job_id), keys.result(job_id),
                  keys.events(job_id), keys.channel(job_id)],
            args=[repr(time.time()), self.result_ttl, result, event, EVENT_FIELD,
                  "1" if queued_only else "0"])
        return text(verdict[0])

    def status(self, job_id: str) -> str | None:
        """The job's status, or None if there is no such job."""
        value = self.redis.hget(self.keys.job(job_id), "status")
        return None if value is None else text(value)

    def statuses(self, job_ids: list[str]) -> list[str | None]:
        """Each job's status (None where it has no record), in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(self.keys.job(job_id), "status")
        return [None if raw is None else text(raw) for raw in pipe.execute()]

    def results(self, job_ids: list[str]) -> dict[str, dict[str, Any] | None]:
        """Each job's stored result envelope (None where there is none), in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.get(self.keys.result(job_id))
        raws = pipe.execute() if job_ids else []
        return {job_id: None if raw is None else json.loads(raw)
                for job_id, raw in zip(job_ids, raws, strict=True)}

    def info(self, job_id: str) -> dict[str, str]:
        """The whole job record (empty if there is none)."""
        raw = self.redis.hgetall(self.keys.job(job_id))
        return {text(k): text(v) for k, v in raw.items()}

    def meta(self, job_id: str) -> dict[str, Any]:
        """The envelope's descriptive fields, from the job record."""
        return meta_from(self.info(job_id))

    def result(self, job_id: str) -> dict[str, Any] | None:
        """The stored result envelope, if any."""
        raw = self.redis.get(self.keys.result(job_id))
        return None if raw is None else json.loads(raw)


def _number(info: dict[str, str], name: str) -> float | None:
    return float(info[name]) if info.get(name) else None


def meta_from(info: dict[str, str]) -> dict[str, Any]:
    """Envelope fields from a job record."""
    def number(name: str) -> float | None:
        return _number(info, name)
    return {"kind": info.get("kind"), "upstream": info.get("upstream"),
            "model": info.get("model") or None, "attempts": int(info.get("attempts", 0)),
            "created_at": number("created_at"), "started_at": number("started_at"),
            "finished_at": number("finished_at")}



def job_view(job_id: str, info: dict[str, str]) -> dict[str, Any]:
    """A job record as typed, documented JSON (the README's "Job status" lists the fields)."""
    def number(name: str) -> float | None:
        return _number(info, name)

    status = info.get("status")
    waiting = status == JobStatus.WAITING.value
    ended = status in TERMINAL
    return {
        "id": job_id, "status": status, "kind": info.get("kind"),
        "model": info.get("model") or None, "upstream": info.get("upstream") or None,
        "queue": info.get("queue") or None, "stream": info.get("stream") == "1",
        "created_at": number("created_at"), "started_at": number("started_at"),
        "finished_at": number("finished_at"),
        "attempt": int(info.get("deliveries") or 0),
        "calls": int(info.get("attempts") or 0) if ended else None,
        "crashes": int(info.get("crashes") or 0),
        "waiting_for": info.get("waiting_for") if waiting else None,
        "waiting_until": number("waiting_until") if waiting else None,
        "batch": info.get("batch") or None,
        "error": json.loads(info["error"]) if info.get("error") else None,
    }
