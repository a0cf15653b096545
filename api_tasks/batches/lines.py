"""The OpenAI Batch API file format: input lines checked, output and error lines built.

Input lines: ``{"custom_id", "method": "POST", "url", "body"}``, the url one of
``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings`` or ``/v1/responses``.
Output lines: ``{"id", "custom_id", "response": {"status_code", "request_id", "body"},
"error": null}``; failed lines go to the
error file as ``{"id", "custom_id", "response", "error": {"code", "message"}}``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from api_tasks.errors import InvalidJob
from api_tasks.record.job_record import JobStatus
from api_tasks.spec import ENDPOINTS, KINDS, Kind, build_spec

__all__ = ["BatchLine", "FileCheck", "check_file", "line_params", "parse_line", "read_batch",
           "record_for", "usage_of"]


@dataclass(frozen=True)
class BatchLine:
    """One request of the input file."""

    number: int
    custom_id: str
    kind: Kind
    body: dict[str, Any]

    @property
    def url(self) -> str:
        """The endpoint the line names."""
        return ENDPOINTS[self.kind].path

    def stored(self) -> str:
        """The line as a batch's input list keeps it (what the workers' pump sends)."""
        return json.dumps({"custom_id": self.custom_id, "kind": self.kind, "body": self.body},
                          separators=(",", ":"))


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
    if url not in KINDS:
        raise InvalidJob(where, f"url must be one of {', '.join(KINDS)}")
    if not isinstance(body, dict):
        raise InvalidJob(where, "body must be a JSON object")
    for field in ("owner", "notify"):  # whose job it is, and who hears of it, are the batch's
        if field in body:
            raise InvalidJob(where, f"body.{field}: not accepted in a batch line")
    kind = KINDS[url]
    first = ENDPOINTS[kind].first
    rest = {k: v for k, v in body.items() if k != first}
    try:
        build_spec(kind, body.get(first), rest, max_bytes)
    except InvalidJob as err:
        raise InvalidJob(where, f"body.{err}") from None
    return BatchLine(number, custom_id, kind, body)


def line_params(kind: Kind, body: dict[str, Any], queue: str) -> tuple[Any, dict[str, Any]]:
    """A line's body as a submit's first argument and parameters.

    The batch sets the queue, and keeps every result for the default ``result_ttl``:
    a line's outcome must outlive the job until the batch has recorded it.
    """
    first = ENDPOINTS[kind].first
    params = {k: v for k, v in body.items() if k not in (first, "result_ttl")}
    return body.get(first), {**params, "queue": queue, "store_result": True}


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
