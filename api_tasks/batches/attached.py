"""Attached batch runs: this process drives a JSONL file and writes results as they land.

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
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from api_tasks.batches.lines import BatchLine, line_params, read_batch, record_for, usage_of
from api_tasks.record.job_record import TERMINAL, JobStatus

if TYPE_CHECKING:
    from api_tasks.enqueue import Enqueuer
    from api_tasks.record.store import JobStore

__all__ = ["BatchSummary", "ended_jobs", "line_job_id", "run_batch"]

Progress = Callable[["BatchSummary"], None]


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
        while group := list(itertools.islice(lines, window)):
            summary.total += len(group)
            todo = [line for line in group if line.custom_id not in done]
            summary.skipped += len(group) - len(todo)
            ids = [line_job_id(output, line) for line in todo]
            # what an earlier run left of these lines' jobs, a window's worth in one round trip
            for line, job_id, earlier in zip(todo, ids, client.store.statuses(ids), strict=True):
                while len(in_flight) >= window:
                    _collect(client, in_flight, out, err, summary, progress, poll)
                if fresh and earlier is not None and client.store.discard(job_id):
                    earlier = None
                if earlier is not None:
                    summary.collected += 1
                if earlier in (None, JobStatus.QUEUED):  # a queued one's message may be lost
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
