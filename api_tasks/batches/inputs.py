"""A running batch's input lines, read by index: from its own list, or from its uploaded file.

A batch uploaded by ``submit_batch`` keeps its lines in its input list. A batch made through
the Batches API keeps no copy of its file: its input list holds where every ``MARK_EVERY``-th
line starts in the file, so a read fetches only the file pieces that hold the lines wanted,
and the batch's own Redis memory grows with its window, not its file.
"""

from __future__ import annotations

import json
from typing import Any

from api_tasks.batches.files import PIECE, FileRecords
from api_tasks.connections import text
from api_tasks.record.calls import SyncShell, command
from api_tasks.record.keys import Keys
from api_tasks.spec import KINDS

__all__ = ["MARK_EVERY", "read_lines"]

MARK_EVERY = 256  # lines between two marks: a read skips fewer lines than this
_PIECES_PER_READ = 2


def read_lines(shell: SyncShell, keys: Keys, batch_id: str, state: dict[str, str], start: int,
               count: int) -> list[dict[str, Any]]:
    """Lines ``start`` to ``start + count`` (from 0) as ``{"custom_id", "kind", "body"}``;
    fewer if the input is gone (its file deleted or expired)."""
    if count <= 0:
        return []
    file_id = state.get("input_file_id")
    if not file_id:
        raw: list[bytes] = shell.run(command("LRANGE", keys.batch_input(batch_id), start,
                                             start + count - 1))
        return [json.loads(line) for line in raw or ()]
    mark: bytes | None = shell.run(command("LINDEX", keys.batch_input(batch_id),
                                           start // MARK_EVERY))
    if mark is None:
        return []
    skip = start % MARK_EVERY
    return [_request(line) for line in _file_lines(shell, FileRecords(keys), file_id,
                                                   int(text(mark)), skip + count)][skip:]


def _file_lines(shell: SyncShell, files: FileRecords, file_id: str, offset: int,
                count: int) -> list[bytes]:
    """Up to ``count`` non-blank lines of a file from byte ``offset`` (a line's start)."""
    lines: list[bytes] = []
    piece, rest = offset // PIECE, b""
    cut = offset % PIECE
    while len(lines) < count:
        pieces = shell.run(files.pieces(file_id, piece, _PIECES_PER_READ))
        if not pieces:
            break
        piece += len(pieces)
        data = rest + b"".join(pieces)[cut:]
        cut = 0
        *complete, rest = data.split(b"\n")
        lines += [line for line in complete if line.strip()]
    if len(lines) < count and rest.strip():
        lines.append(rest)
    return lines[:count]


def _request(raw: bytes) -> dict[str, Any]:
    """A checked line of the file as the pump sends it."""
    line = json.loads(raw)
    return {"custom_id": line["custom_id"], "kind": KINDS[line["url"]], "body": line["body"]}
