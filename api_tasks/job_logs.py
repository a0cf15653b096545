"""What a worker's log lines say about the job they concern, and the JSON log format.

The runner opens a job's context for as long as it runs it (``job_context``) and
fills it in as it learns more (``note_job``); a filter on the log handlers stamps
every record with it, so each line about a job carries its id, attempt,
upstream, deployment, model and queue, whichever module wrote it. With
``worker.log_format: json`` each line is one JSON object (``JsonFormatter``).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["JobFields", "JsonFormatter", "job_context", "note_job"]

_current: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "api_tasks_job", default=None)
# the LogRecord attributes every record has: what is not among them came from ``extra``;
# and Celery's ``data``, its task's context (the job id, taken above, but also the reprs of
# its arguments and return value: a plain Celery client's prompt)
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message", "asctime", "job", "data"}


@contextlib.contextmanager
def job_context(job_id: str) -> Iterator[None]:
    """Log lines written in this block (this thread or greenlet) are about job ``job_id``."""
    token = _current.set({"job_id": job_id})
    try:
        yield
    finally:
        _current.reset(token)


def note_job(**fields: Any) -> None:
    """Add what is now known of the current job (attempt, upstream, model...) to its lines."""
    current = _current.get()
    if current is not None:
        current.update({k: v for k, v in fields.items() if v is not None})


class JobFields(logging.Filter):
    """Stamps each record with the job its thread is running (``record.job``; {} if none)."""

    def filter(self, record: logging.LogRecord) -> bool:
        current = _current.get()
        if current:
            record.job = dict(current)
        else:  # Celery's own lines on a task ("received", "succeeded in") name its id
            data = getattr(record, "data", None)
            record.job = {"job_id": data["id"]} if isinstance(data, dict) and "id" in data \
                else {}
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, process, message, the job's fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name, "process": record.process,
            "message": record.getMessage(), **getattr(record, "job", {})}
        line.update({k: v for k, v in record.__dict__.items()
                     if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)
