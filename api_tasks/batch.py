"""Batch runs in the OpenAI Batch API file format, from a JSONL file to JSONL results.

Input lines: ``{"custom_id", "method": "POST", "url": "/v1/chat/completions" or
"/v1/completions", "body"}``. Output lines: ``{"id", "custom_id", "response":
{"status_code", "request_id", "body"}, "error": null}``; failed lines go to the
error file as ``{"id", "custom_id", "response", "error": {"code", "message"}}``.

The whole input is checked first, with line numbers, before anything is sent.
Then at most ``window`` jobs are queued at once (memory and Redis stay bounded
whatever the file's size), and each result is written as it lands. A run
started again with the same output file skips every ``custom_id`` already in
the output or error file, so an interrupted run resumes without a duplicate;
a line's job id is derived from the output file and the line, so a line whose
job was in flight when the run stopped is collected, not sent again (for as
long as Redis keeps its result). ``fresh`` calls the ended ones again.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from api_tasks.errors import InvalidJob
from api_tasks.events import TERMINAL, JobStatus
from api_tasks.spec import Kind, build_spec

if TYPE_CHECKING:
    from api_tasks.enqueue import Enqueuer
    from api_tasks.store import JobStore

__all__ = ["BatchLine", "BatchSummary", "FileCheck", "check_file", "ended_jobs", "line_job_id",
           "line_params", "parse_line", "read_batch", "record_for", "run_batch", "usage_of"]

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
    skipped: int = 0  # already in the output or error file
    collected: int = 0  # whose job an earlier run with this output file had already sent
    completed: int = 0
    failed: int = 0
    usage: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def add_usage(self, usage: dict[str, int]) -> None:
        """Sum a response's usage counts in."""
        for name, value in usage.items():
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


def line_params(kind: Kind, body: dict[str, Any], queue: str) -> tuple[Any, dict[str, Any]]:
    """A line's body as a submit's first argument and parameters.

    The batch sets the queue, and keeps every result for the default ``result_ttl``:
    a line's outcome must outlive the job until the batch has recorded it.
    """
    params = {k: v for k, v in body.items() if k not in (_FIRST[kind], "result_ttl")}
    return body.get(_FIRST[kind]), {**params, "queue": queue, "store_result": True}


def read_batch(path: Path, max_bytes: int) -> Iterator[BatchLine]:
    """The input's lines, one at a time (blank lines are skipped)."""
    with path.open(encoding="utf-8") as lines:
        for number, text in enumerate(lines, start=1):
            if text.strip():
                yield parse_line(number, text, max_bytes)


class FileCheck(NamedTuple):
    """A batch file checked: every problem, as "line N: ...", and how many lines it has."""

    problems: list[str]
    lines: int


def check_file(path: Path, max_bytes: int) -> FileCheck:
    """Every problem in the input (none when it can run), and its count of lines."""
    problems: list[str] = []
    seen: dict[str, int] = {}  # custom_id -> the line it first appeared on
    count = 0
    with path.open(encoding="utf-8") as lines:
        for number, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            count += 1
            try:
                line = parse_line(number, text, max_bytes)
            except InvalidJob as err:
                problems.append(str(err))
                continue
            if line.custom_id in seen:
                problems.append(f"line {number}: custom_id {line.custom_id!r} is already used "
                                f"on line {seen[line.custom_id]}")
            else:
                seen[line.custom_id] = number
    return FileCheck(problems, count)


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


def run_batch(client: Enqueuer, source: Path, output: Path, errors: Path, *, window: int = 200,
              queue: str = "bulk", progress: Progress | None = None,
              poll: float = 0.05, fresh: bool = False) -> BatchSummary:
    """Run every not-yet-finished line of ``source``, writing results as they land.

    A line whose job an earlier run with this output file sent is collected, not sent
    again (``summary.collected``); with ``fresh``, an ended one is forgotten and called
    again (one still queued or running is collected: it is being called now).
    """
    summary = BatchSummary()
    done = finished_ids(output, errors)
    lines = read_batch(source, client.settings.jobs.max_request_bytes)
    in_flight: dict[str, BatchLine] = {}
    with output.open("a", encoding="utf-8") as out, errors.open("a", encoding="utf-8") as err:
        for line in lines:
            summary.total += 1
            if line.custom_id in done:
                summary.skipped += 1
                continue
            while len(in_flight) >= window:
                _collect(client, in_flight, out, err, summary, progress, poll)
            job_id = line_job_id(output, line)
            earlier = client.store.status(job_id)
            if fresh and earlier is not None and client.store.discard(job_id):
                earlier = None
            if earlier is not None:
                summary.collected += 1
            if earlier in (None, JobStatus.QUEUED.value):  # a queued one's message may be lost
                client.enqueue(line.kind, *line_params(line.kind, line.body, queue),
                               job_id=job_id)
            in_flight[job_id] = line
        while in_flight:
            _collect(client, in_flight, out, err, summary, progress, poll)
    return summary


def line_job_id(output: Path, line: BatchLine) -> str:
    """The same job id for the same line and output file, run after run.

    A run interrupted with jobs in flight and started again finds those jobs (ended,
    or still going) instead of sending their lines a second time.
    """
    digest = hashlib.sha256("\0".join([
        str(output.resolve()), line.custom_id, line.kind,
        json.dumps(line.body, sort_keys=True, separators=(",", ":"))]).encode())
    return f"run-{digest.hexdigest()[:32]}"


def _collect(client: Enqueuer, in_flight: dict[str, BatchLine], out: Any, err: Any,
             summary: BatchSummary, progress: Progress | None, poll: float) -> None:
    """Write every finished job's line (two round trips for all of them), or wait a little."""
    finished = ended_jobs(client.store, list(in_flight))
    for job_id, stored in finished.items():
        line = in_flight.pop(job_id)
        ok, record = record_for(job_id, line.custom_id, stored)
        (out if ok else err).write(json.dumps(record) + "\n")
        if ok:
            summary.completed += 1
            summary.add_usage(usage_of(stored))
        else:
            summary.failed += 1
    out.flush()
    err.flush()
    if finished and progress is not None:
        progress(summary)
    if not finished:
        time.sleep(poll)


def ended_jobs(store: JobStore, job_ids: list[str]) -> dict[str, dict[str, Any] | None]:
    """The stored envelopes of those jobs that ended (None where none was stored)."""
    statuses = store.statuses(job_ids)
    return store.results([job_id for job_id, status in zip(job_ids, statuses, strict=True)
                          if status in TERMINAL])


def usage_of(stored: dict[str, Any] | None) -> dict[str, int]:
    """The integer token counts of a stored response's usage."""
    usage = ((stored or {}).get("response") or {}).get("usage") or {}
    return {k: v for k, v in usage.items() if isinstance(v, int) and not isinstance(v, bool)}


def record_for(job_id: str, custom_id: str,
               stored: dict[str, Any] | None) -> tuple[bool, dict[str, Any]]:
    """A finished job's line: (True, output record) or (False, error-file record)."""
    record_id = f"batch_req_{job_id}"
    if stored is not None and stored.get("status") == JobStatus.SUCCEEDED.value:
        return True, {"id": record_id, "custom_id": custom_id, "error": None,
                      "response": {"status_code": 200, "request_id": job_id,
                                   "body": stored.get("response")}}
    error = (stored or {}).get("error") or _NO_RESULT
    response = None if error.get("status") is None else {
        "status_code": error["status"], "request_id": job_id, "body": {"error": error}}
    return False, {"id": record_id, "custom_id": custom_id, "response": response,
                   "error": {"code": error.get("code"), "message": error.get("message")}}


_NO_RESULT = {"code": "result_missing", "status": None,
              "message": "the job ended but its result is gone (expired, or store_result false)"}
