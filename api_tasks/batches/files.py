"""Uploaded files (OpenAI's Files API): their bytes in Redis, in pieces, owned by a gateway key.

A file is a hash (``Keys.file``: name, size, purpose, owner, times) and a list of pieces of at
most ``PIECE`` bytes (``Keys.file_data``), both expiring when the file does. The pieces are
written as the upload arrives and the hash last, so a file is listed only once whole; an
upload cut short leaves pieces that expire with it. Each owner's files are indexed by upload
time (``Keys.owned_files``). ``FileRecords`` builds the calls and parses the replies; the
gateway runs them on asyncio, as the workers will on a sync client.
"""

from __future__ import annotations

import time
import uuid
from enum import StrEnum
from typing import Any

from api_tasks.connections import text_map
from api_tasks.record.calls import Call, Writes, command, lua
from api_tasks.record.keys import Keys
from config.settings import FILE_TTL_RANGE

__all__ = ["INDEX_TTL", "PIECE", "FileRecords", "Purpose", "file_object", "new_file_id"]

PIECE = 1024 * 1024  # bytes per list entry: far below Redis's limits, few entries per file
INDEX_TTL = FILE_TTL_RANGE[1]  # an owner's index of files or batches: nothing listed lives longer


class Purpose(StrEnum):
    """What a file is for (OpenAI's names)."""

    BATCH = "batch"  # a batch's input, uploaded
    BATCH_OUTPUT = "batch_output"  # a batch's output or error file, written by the project


def new_file_id() -> str:
    """A fresh file id, in OpenAI's form."""
    return f"file-{uuid.uuid4().hex}"


class FileRecords:
    """The calls that store, find, read and delete files (no I/O: a shell runs them)."""

    def __init__(self, keys: Keys) -> None:
        self.keys = keys

    def append(self, file_id: str, piece: bytes, ttl: int) -> list[Call[Any]]:
        """Add the next piece of a file being uploaded."""
        data = self.keys.file_data(file_id)
        return [command("RPUSH", data, piece), command("EXPIRE", data, ttl)]

    def create(self, file_id: str, owner: str, filename: str, size: int, purpose: Purpose,
               ttl: int) -> tuple[dict[str, str], Writes]:
        """A file whose pieces are all in: its record, and the writes that make it visible."""
        now = time.time()
        meta = {"filename": filename, "bytes": str(size), "purpose": purpose.value,
                "owner": owner, "created_at": str(int(now)), "expires_at": str(int(now) + ttl)}
        key = self.keys.file(file_id)
        flat = [item for pair in meta.items() for item in pair]
        return meta, Writes(
            [command("HSET", key, *flat), command("EXPIRE", key, ttl),
             command("EXPIRE", self.keys.file_data(file_id), ttl)],
            [lua("owner_index", [self.keys.owned_files(owner)], [file_id, INDEX_TTL])])

    def meta(self, file_id: str) -> Call[dict[str, str]]:
        """A file's record (empty if there is none)."""
        return command("HGETALL", self.keys.file(file_id), parse=text_map)

    def pieces(self, file_id: str, first: int, count: int) -> Call[list[bytes]]:
        """Up to ``count`` pieces of a file's bytes from piece ``first``."""
        return command("LRANGE", self.keys.file_data(file_id), first, first + count - 1,
                       parse=lambda reply: list(reply or []))

    def forget(self, owner: str, file_ids: list[str]) -> Call[Any]:
        """Drop files whose records are gone from their owner's index."""
        return command("ZREM", self.keys.owned_files(owner), *file_ids)

    def delete(self, file_id: str, owner: str) -> list[Call[Any]]:
        """Delete a file: record, bytes and index entry."""
        return [command("DEL", self.keys.file(file_id), self.keys.file_data(file_id)),
                self.forget(owner, [file_id])]

    def discard(self, file_id: str) -> Call[Any]:
        """Drop the pieces of an upload that failed."""
        return command("DEL", self.keys.file_data(file_id))


def file_object(file_id: str, meta: dict[str, str]) -> dict[str, Any]:
    """A file as OpenAI shows it (``status`` is deprecated there, but its SDK requires it)."""
    return {"id": file_id, "object": "file", "bytes": int(meta.get("bytes") or 0),
            "created_at": int(meta.get("created_at") or 0),
            "expires_at": int(meta["expires_at"]) if meta.get("expires_at") else None,
            "filename": meta.get("filename", ""), "purpose": meta.get("purpose", ""),
            "status": "processed", "status_details": None}
