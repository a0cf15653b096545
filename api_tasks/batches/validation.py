"""Checking an uploaded file as a batch's input, line by line, as its pieces are read.

A batch made through the Batches API starts ``validating``: a worker reads its input file
from Redis a few pieces at a time, checks every line (``lines.parse_line``, the batch's own
endpoint, unique ``custom_id``s, the line cap) and stages where every ``MARK_EVERY``-th line
starts in a list of its own (the batch reads its lines from the file, keeping no copy). Then
one script either starts the batch on them or, if any line was bad, ends it ``failed`` with
every problem by line number, nothing run. A worker that dies half way leaves a staged
list that expires; the next one starts over on a list of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from api_tasks.batches.files import FileRecords
from api_tasks.batches.inputs import MARK_EVERY, FileLines, LineTooLong
from api_tasks.batches.lines import parse_line
from api_tasks.errors import InvalidJob
from api_tasks.record.calls import SyncShell, command

__all__ = ["MAX_REPORTED", "Checked", "check_input"]

MAX_REPORTED = 100  # problems a failed batch lists (its count says how many there were)
_STAGE_MARKS = 500  # marks per RPUSH of the staged list


@dataclass
class Checked:
    """An input file checked: its good lines (staged), its problems, its first model."""

    total: int = 0
    model: str = ""
    problems: list[dict[str, Any]] = field(default_factory=list)
    found: int = 0  # problems in all, reported or not

    def refuse(self, code: str, message: str, line: int | None = None,
               param: str | None = None) -> None:
        """Note a problem (the first ``MAX_REPORTED`` are kept)."""
        self.found += 1
        if len(self.problems) < MAX_REPORTED:
            self.problems.append({"code": code, "line": line, "message": message,
                                  "param": param})


class _Unreadable(Exception):
    """The file cannot be read whole: it changed or went away, or a line is too long."""

    def __init__(self, code: str, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.line = code, message, line


def check_input(shell: SyncShell, files: FileRecords, file_id: str, size: int, endpoint: str,
                staged: str, ttl: int, max_lines: int, max_request_bytes: int) -> Checked:
    """Check file ``file_id`` (``size`` bytes) as the input of a batch on ``endpoint``; where
    every ``MARK_EVERY``-th line starts goes to list ``staged`` (for ``ttl`` seconds), the
    pump's index into the file (``inputs.read_lines``)."""
    checked = Checked()
    try:
        _check(shell, files, file_id, size, endpoint, staged, ttl, max_lines,
               max_request_bytes, checked)
    except _Unreadable as err:
        checked.refuse(err.code, err.message, err.line)
    return checked


def _check(shell: SyncShell, files: FileRecords, file_id: str, size: int, endpoint: str,
           staged: str, ttl: int, max_lines: int, max_request_bytes: int,
           checked: Checked) -> None:
    seen: dict[str, int] = {}  # custom_id -> the line it first appeared on
    marks: list[str] = []

    def flush() -> None:
        if marks:
            shell.run_all([command("RPUSH", staged, *marks), command("EXPIRE", staged, ttl)])
            marks.clear()

    # a line's JSON wraps a body of at most max_request_bytes, escaped at worst 6 bytes for 1
    lines = FileLines(shell, files, file_id, longest=6 * max_request_bytes + 65536)
    number = 0
    try:
        for number, (at, raw) in enumerate(lines, start=1):
            if not raw.strip():
                continue
            if checked.total % MARK_EVERY == 0 and not checked.found:
                marks.append(str(at))
                if len(marks) >= _STAGE_MARKS:
                    flush()
            checked.total += 1
            if checked.total > max_lines:
                checked.refuse("too_many_lines", f"the file has more than {max_lines} requests "
                               "(files.max_lines)", number)
                return
            try:
                line = parse_line(number, raw.decode("utf-8"), max_request_bytes)
            except UnicodeDecodeError:
                checked.refuse("invalid_json_line", "the line is not valid UTF-8", number)
                continue
            except InvalidJob as err:
                param, _, message = err.message.partition(": ")
                if not message or not param.startswith("body."):  # "url must be one of ..."
                    message = err.message
                    word = message.split(" ", 1)[0]
                    param = word if word in ("custom_id", "method", "url", "body") else ""
                checked.refuse("invalid_request", message, number, param or None)
                continue
            if line.url != endpoint:
                checked.refuse("mismatched_endpoint", f"url is {line.url!r}, not the batch's "
                               f"endpoint {endpoint!r}", number, "url")
            elif line.custom_id in seen:
                checked.refuse("duplicate_custom_id", f"custom_id {line.custom_id!r} is already "
                               f"used on line {seen[line.custom_id]}", number, "custom_id")
            else:
                seen[line.custom_id] = number
                checked.model = checked.model or str(line.body.get("model") or "")
    except LineTooLong as err:
        raise _Unreadable("line_too_long", str(err), number + 1) from None
    if lines.end != size:
        raise _Unreadable("file_changed", f"{lines.end} of the file's {size} bytes could be "
                          "read: it was deleted or expired while it was checked")
    if not checked.total and not checked.found:
        checked.refuse("empty_file", "the file has no requests")
    if not checked.found:
        flush()
