"""A batch's input lines: read from an uploaded file by offset, or from the batch's own list.

A batch uploaded by ``submit_batch`` keeps its lines in its input list. A batch made through
the Batches API keeps no copy of its file: its input list holds where every ``MARK_EVERY``-th
line starts in the file (``marks``), so a read fetches only the pieces that hold the lines
wanted, and the batch's own Redis memory grows with its window, not its file.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from api_tasks.batches.files import PIECE, FileRecords
from api_tasks.connections import text
from api_tasks.record.calls import SyncShell, command
from api_tasks.record.keys import Keys
from api_tasks.spec import KINDS

__all__ = ["BOM", "MARK_EVERY", "FileLines", "LineTooLong", "PieceCache", "read_lines"]

MARK_EVERY = 256  # lines between two marks: a read skips fewer lines than this
BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark some editors put first: not part of line 1
INPUT_MARKS = "marks"  # a batch hash's ``input`` when its input list holds marks


class LineTooLong(Exception):
    """A line passed the longest a reader accepts."""


class PieceCache:
    """The file pieces one pump read last (they never change), so consecutive reads of a
    file do not fetch the same megabyte again."""

    def __init__(self, size: int = 4) -> None:
        self._size = size
        self._pieces: OrderedDict[tuple[str, int], bytes] = OrderedDict()

    def get(self, shell: SyncShell, files: FileRecords, file_id: str, index: int) -> bytes:
        """Piece ``index`` of a file (b"" past its end)."""
        found = self._pieces.get((file_id, index))
        if found is not None:
            self._pieces.move_to_end((file_id, index))
            return found
        pieces = shell.run(files.pieces(file_id, index, 1))
        piece = bytes(pieces[0]) if pieces else b""
        if piece:
            self._pieces[(file_id, index)] = piece
            while len(self._pieces) > self._size:
                self._pieces.popitem(last=False)
        return piece


class FileLines:
    """A file's lines from byte ``offset`` (a line's start), each with where it starts; after
    the last, ``end`` is where the bytes read ended."""

    def __init__(self, shell: SyncShell, files: FileRecords, file_id: str, offset: int = 0,
                 longest: int | None = None, cache: PieceCache | None = None) -> None:
        self._shell, self._files, self._file_id = shell, files, file_id
        self._offset, self._longest = offset, longest
        self._cache = cache or PieceCache(1)
        self.end = offset

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        index, cut = divmod(self._offset, PIECE)
        rest, at = b"", self._offset
        while piece := self._cache.get(self._shell, self._files, self._file_id, index):
            data = rest + piece[cut:]
            if at == 0 and data.startswith(BOM):
                data, at = data[len(BOM):], len(BOM)
            self.end += len(piece) - cut
            index, cut = index + 1, 0
            *complete, rest = data.split(b"\n")
            for line in complete:
                yield at, line
                at += len(line) + 1
            if self._longest is not None and len(rest) > self._longest:
                raise LineTooLong(f"the line is longer than {self._longest} bytes")
        if rest:
            yield at, rest


def read_lines(shell: SyncShell, keys: Keys, batch_id: str, state: dict[str, str], start: int,
               count: int, cache: PieceCache | None = None) -> list[dict[str, Any]]:
    """Lines ``start`` to ``start + count`` (from 0) as ``{"custom_id", "kind", "body"}``;
    fewer if the input is gone (its file deleted or expired)."""
    if count <= 0:
        return []
    if state.get("input") != INPUT_MARKS:
        raw: list[bytes] = shell.run(command("LRANGE", keys.batch_input(batch_id), start,
                                             start + count - 1))
        return [json.loads(line) for line in raw or ()]
    file_id = state.get("input_file_id", "")
    replies: list[Any] = shell.run_all([command("LINDEX", keys.batch_input(batch_id),
                                                start // MARK_EVERY),
                                        command("EXISTS", keys.file_data(file_id))])
    mark, there = replies
    if mark is None or not there:  # deleted: cached pieces must not outlive it
        return []
    skip, wanted = start % MARK_EVERY, []
    lines = FileLines(shell, FileRecords(keys), file_id, int(text(mark)), cache=cache)
    for _, line in lines:
        if line.strip():
            if skip:
                skip -= 1
                continue
            wanted.append(_request(line))
            if len(wanted) == count:
                break
    return wanted


def _request(raw: bytes) -> dict[str, Any]:
    """A checked line of the file as the pump sends it."""
    line = json.loads(raw)
    return {"custom_id": line["custom_id"], "kind": KINDS[line["url"]], "body": line["body"]}
