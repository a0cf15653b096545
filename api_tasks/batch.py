"""Batch runs in the OpenAI Batch API file format, from a JSONL file to JSONL results.

Input lines: ``{"custom_id", "method": "POST", "url": "/v1/chat/completions" or
"/v1/completions", "body"}``. Output lines: ``{"id", "custom_id", "response":
{"status_code", "request_id", "body"}, "error": null}``; failed lines go to the
error file as ``{"id", "custom_id", "response", "error": {"code", "message"}}``.

The whole input is checked first, with line numbers, before anything is sent.
Then at most ``window`` jobs are queued at once (memory and Redis stay bounded
whatever the file's size), and each result is written as it lands. A run
started again with the same output file skips every ``custom_id`` already in
the output or error file, so an interrupted run resumes without a duplicate.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from api_tasks.client import Client
from api_tasks.errors import InvalidJob, JobCancelled, JobFailed
from api_tasks.events import TERMINAL
from api_tasks.jobs import Job
from api_tasks.spec import Kind, build_spec

__all__ = ["BatchLine", "BatchSummary", "check_file", "read_batch", "run_batch"]

ENDPOINTS: dict[str, Kind] = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
_FIRST = {"chat": "messages", "completion": "prompt"}
Progress = Callable[["BatchSummary"], None]


@dataclass(frozen=True)
class BatchLine:
    """One request of the input file."""

    number: int
    custom_id: str
    kind: Kind
    body: dict[str, Any]


@dataclass
class BatchSummary:
    """Counts and token usage of a run so far."""

    total: int = 0
    skipped: int = 0
    completed: int = 0
    failed: int = 0
    usage: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def add_usage(self, usage: Any) -> None:
        """Sum a response's usage counts in."""
        for name, value in (usage or {}).items():
            if isinstance(value, int):
                self.usage[name] = self.usage.get(name, 0) + value


def parse_line(number: int, text: str, max_bytes: int) -> BatchLine:
    """One input line, checked; raises ``InvalidJob`` whose param names the line."""
    where = f"line {number}"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise InvalidJob(where, f"not JSON ({err.msg})") from None
    if not isinstance(data, dict):
        raise InvalidJob(where, "must be a JSON object")
    custom_id, url, body = data.get("custom_id"), data.get("url"), data.get("body")
    if not isinstance(custom_id, str) or not custom_id:
        raise InvalidJob(where, "custom_id must be a non-empty string")
    if data.get("method", "POST") != "POST":
        raise InvalidJob(where, "method must be POST")
    if url not in ENDPOINTS:
        raise InvalidJob(where, f"url must be one of {', '.join(ENDPOINTS)}")
    if not isinstance(body, dict):
        raise InvalidJob(where, "body must be a JSON object")
    kind = ENDPOINTS[url]
    rest = {k: v for k, v in body.items() if k != _FIRST[kind]}
    try:
        build_spec(kind, body.get(_FIRST[kind]), rest, max_bytes)
    except InvalidJob as err:
        raise InvalidJob(where, f"body.{err}") from None
    return BatchLine(number, custom_id, kind, body)


def read_batch(path: Path, max_bytes: int) -> Iterator[BatchLine]:
    """The input's lines, one at a time (blank lines are skipped)."""
    with path.open(encoding="utf-8") as lines:
        for number, text in enumerate(lines, start=1):
            if text.strip():
                yield parse_line(number, text, max_bytes)


def check_file(path: Path, max_bytes: int) -> list[str]:
    """Every problem in the input, as "line N: ..." (empty when it can run)."""
    problems, seen = [], set()
    with path.open(encoding="utf-8") as lines:
        for number, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            try:
                line = parse_line(number, text, max_bytes)
            except InvalidJob as err:
                problems.append(str(err))
                continue
            if line.custom_id in seen:
                problems.append(f"line {number}: custom_id {line.custom_id!r} appears twice")
            seen.add(line.custom_id)
    return problems


def finished_ids(*paths: Path) -> set[str]:
    """custom_ids already written; a last line cut short by a crash is removed."""
    done: set[str] = set()
    for path in paths:
        if not path.exists():
            continue
        _drop_partial_line(path)
        with path.open(encoding="utf-8") as lines:
            done.update(json.loads(text)["custom_id"] for text in lines if text.strip())
    return done


def _drop_partial_line(path: Path) -> None:
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def run_batch(client: Client, source: Path, output: Path, errors: Path, *, window: int = 200,
              queue: str = "bulk", progress: Progress | None = None,
              poll: float = 0.05) -> BatchSummary:
    """Run every not-yet-finished line of ``source``, writing results as they land."""
    summary = BatchSummary()
    done = finished_ids(output, errors)
    lines = read_batch(source, client.settings.jobs.max_request_bytes)
    in_flight: dict[str, tuple[Job, BatchLine]] = {}
    with output.open("a", encoding="utf-8") as out, errors.open("a", encoding="utf-8") as err:
        for line in lines:
            summary.total += 1
            if line.custom_id in done:
                summary.skipped += 1
                continue
            while len(in_flight) >= window:
                _collect(client, in_flight, out, err, summary, progress, poll)
            job = client.submit(line.kind, line.body.get(_FIRST[line.kind]),
                                {**{k: v for k, v in line.body.items()
                                    if k != _FIRST[line.kind]}, "queue": queue})
            in_flight[job.id] = (job, line)
        while in_flight:
            _collect(client, in_flight, out, err, summary, progress, poll)
    return summary


def _collect(client: Client, in_flight: dict[str, tuple[Job, BatchLine]], out: Any, err: Any,
             summary: BatchSummary, progress: Progress | None, poll: float) -> None:
    """Write every finished job's line (one round trip for all statuses), or wait a little."""
    pipe = client.redis.pipeline(transaction=False)
    for job_id in in_flight:
        pipe.hget(client.keys.job(job_id), "status")
    statuses = pipe.execute()
    finished = [job_id for job_id, status in zip(list(in_flight), statuses, strict=True)
                if status is not None and status.decode() in TERMINAL]
    for job_id in finished:
        job, line = in_flight.pop(job_id)
        _write(job, line, out, err, summary)
    if finished and progress is not None:
        progress(summary)
    if not finished:
        time.sleep(poll)


def _write(job: Job, line: BatchLine, out: Any, err: Any, summary: BatchSummary) -> None:
    record_id = f"batch_req_{job.id}"
    try:
        body = job.result(timeout=30)
    except (JobFailed, JobCancelled) as failure:
        error = failure.error
        response = None if error.get("status") is None else {
            "status_code": error["status"], "request_id": job.id, "body": {"error": error}}
        err.write(json.dumps({"id": record_id, "custom_id": line.custom_id, "response": response,
                              "error": {"code": error.get("code"),
                                        "message": error.get("message")}}) + "\n")
        err.flush()
        summary.failed += 1
        return
    out.write(json.dumps({"id": record_id, "custom_id": line.custom_id,
                          "response": {"status_code": 200, "request_id": job.id, "body": body},
                          "error": None}) + "\n")
    out.flush()
    summary.completed += 1
    summary.add_usage((body or {}).get("usage"))
