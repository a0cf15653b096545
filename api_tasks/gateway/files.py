"""OpenAI's Files API on the gateway: upload, list, read, download and delete a key's files.

An upload is parsed as it arrives (``python_multipart``'s streaming parser) and its bytes go
to Redis a piece at a time (``batches.files``): a gateway holds at most a piece and a network
read of any upload, however large, and keeps nothing on disk.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import anyio
import redis
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from api_tasks.batches.files import PIECE, FileRecords, Purpose, file_object, new_file_id
from api_tasks.gateway.errors import GatewayError
from api_tasks.gateway.listing import limit, listed, owned, page_response
from api_tasks.record.calls import command
from api_tasks.record.store import OwnerIndex
from config.settings import FILE_TTL_RANGE

__all__ = ["delete_file", "file_content", "get_file", "list_files", "upload_file"]

_UPLOAD_TTL = 3600  # pieces of an upload not yet whole expire this soon if it is cut short
_FORM_SLACK = 64 * 1024  # what a multipart body may add to its file: boundaries, fields
_FIELD_BYTES = 1024  # a form field other than the file
_FIELDS = 16  # form fields other than the file
_PIECES_PER_READ = 2  # pieces one read of a download takes: what a download holds at a time
_LINES_PER_READ = 1000  # lines of a batch's output file one read takes


class _Form:
    """One multipart body as it is parsed: its small fields, and its file in pieces."""

    def __init__(self, boundary: bytes, max_bytes: int) -> None:
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.size = 0
        self.ready: list[bytes] = []  # whole pieces of the file, not yet stored
        self._max = max_bytes
        self._pending = bytearray()
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._part: str | None = None
        self._is_file = False
        self._value = bytearray()
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self._begin, "on_part_data": self._data, "on_part_end": self._end,
            "on_header_field": lambda d, s, e: self._header_field.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._header_value.extend(d[s:e]),
            "on_header_end": self._header_end, "on_headers_finished": self._headers_done})

    def _begin(self) -> None:
        self._headers, self._part, self._is_file = {}, None, False
        self._value = bytearray()

    def _header_end(self) -> None:
        self._headers[bytes(self._header_field).lower()] = bytes(self._header_value)
        self._header_field, self._header_value = bytearray(), bytearray()

    def _headers_done(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._part = options.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in options:
            if self._part != "file":
                raise GatewayError(400, f"unexpected file field {self._part!r}: send the file "
                                   "as 'file'", param=self._part, code="invalid_file")
            if self.filename is not None:
                raise GatewayError(400, "send one file", param="file", code="invalid_file")
            self._is_file = True
            self.filename = options[b"filename"].decode("utf-8", "replace")[:255] or "file"

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            self.size += end - start
            if self.size > self._max:
                raise GatewayError(413, f"the file is larger than files.max_bytes "
                                   f"({self._max} bytes)", param="file", code="file_too_large")
            self._pending += data[start:end]
            while len(self._pending) >= PIECE:
                self.ready.append(bytes(self._pending[:PIECE]))
                del self._pending[:PIECE]
        else:
            self._value += data[start:end]
            if len(self._value) > _FIELD_BYTES:
                raise GatewayError(400, f"the form field {self._part!r} is too long",
                                   param=self._part, code="invalid_request")

    def _end(self) -> None:
        if self._is_file:
            if self._pending:
                self.ready.append(bytes(self._pending))
                self._pending.clear()
        elif self._part:
            if len(self.fields) >= _FIELDS:
                raise GatewayError(400, f"the form has more than {_FIELDS} fields",
                                   param=self._part, code="invalid_request")
            self.fields[self._part] = self._value.decode("utf-8", "replace")


def _ttl(fields: dict[str, str], default: int) -> int:
    """The file's lifetime from ``expires_after[anchor]`` and ``expires_after[seconds]``."""
    anchor, seconds = fields.get("expires_after[anchor]"), fields.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return default
    if anchor != "created_at":
        raise GatewayError(400, "expires_after[anchor] must be 'created_at'",
                           param="expires_after.anchor", code="invalid_expires_after")
    low, high = FILE_TTL_RANGE
    if seconds is None or not seconds.isdigit() or not low <= int(seconds) <= high:
        raise GatewayError(400, f"expires_after[seconds] must be a whole number from {low} to "
                           f"{high}", param="expires_after.seconds", code="invalid_expires_after")
    return int(seconds)


async def upload_file(request: Request) -> Response:
    """``POST /v1/files``: a multipart upload (``file``, ``purpose=batch``)."""
    gateway = request.app.state.gateway
    key = gateway.key(request)
    limits = gateway.settings.files
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        raise GatewayError(415, "send the file as multipart/form-data", code="invalid_file")
    cap = limits.max_bytes + _FORM_SLACK
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > cap:
        raise GatewayError(413, f"the file is larger than files.max_bytes ({limits.max_bytes} "
                           "bytes)", param="file", code="file_too_large")
    form = _Form(options[b"boundary"], limits.max_bytes)
    records, shell = FileRecords(gateway.keys), gateway.store.shell
    file_id, stored, received = new_file_id(), 0, 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > cap:
                raise GatewayError(413, f"the body is larger than files.max_bytes "
                                   f"({limits.max_bytes} bytes) allows", param="file",
                                   code="file_too_large")
            form.parser.write(chunk)
            stored += await _store(shell, records, file_id, form)
        form.parser.finalize()
        stored += await _store(shell, records, file_id, form)
        if form.filename is None:
            raise GatewayError(400, "no file in the form: send it as 'file'", param="file",
                               code="invalid_file")
        purpose = form.fields.get("purpose")
        if purpose != Purpose.BATCH:
            raise GatewayError(400, f"purpose must be 'batch', not {purpose!r}: only batch "
                               "inputs are kept", param="purpose", code="invalid_purpose")
        ttl = _ttl(form.fields, limits.default_ttl)
        meta, writes = records.create(file_id, key.name, form.filename, form.size,
                                      Purpose.BATCH, ttl)
        await shell.run_all(writes.record, transaction=True)
    except BaseException:
        if stored:  # no file: its pieces go now, not when they expire (unless the record was
            # written after all, its reply lost: then the file stands)
            with anyio.CancelScope(shield=True), contextlib.suppress(redis.RedisError):
                if not await shell.run(records.meta(file_id)):
                    await shell.run(records.discard(file_id))
        raise
    with anyio.CancelScope(shield=True):  # the file is made: its index follows, whatever
        await shell.follow(writes.after)  # the client does now
    return JSONResponse(file_object(file_id, meta))


async def _store(shell: Any, records: FileRecords, file_id: str, form: _Form) -> int:
    """Store the pieces the parser completed; how many."""
    pieces, form.ready = form.ready, []
    calls = [call for piece in pieces for call in records.append(file_id, piece, _UPLOAD_TTL)]
    if calls:
        await shell.run_all(calls)
    return len(pieces)


async def _owned(request: Request, file_id: str) -> dict[str, str]:
    """The record of a file of the caller's key (404 for any other, as if it did not exist)."""
    gateway = request.app.state.gateway
    return owned(await gateway.store.shell.run(FileRecords(gateway.keys).meta(file_id)),
                 gateway.key(request), f"No such File object: {file_id}", "file_not_found")


async def get_file(request: Request) -> Response:
    """``GET /v1/files/{file_id}``."""
    file_id = request.path_params["file_id"]
    return JSONResponse(file_object(file_id, await _owned(request, file_id)))


async def file_content(request: Request) -> Response:
    """``GET /v1/files/{file_id}/content``: the bytes, read from Redis as they are sent."""
    file_id = request.path_params["file_id"]
    meta = await _owned(request, file_id)
    gateway = request.app.state.gateway
    records, shell = FileRecords(gateway.keys), gateway.store.shell

    batch = meta.get("batch")
    if batch:  # a batch's output or error file: its lines, read from the batch's list
        lines = (gateway.keys.batch_output if meta.get("list") == "output"
                 else gateway.keys.batch_errors)(batch)

    async def body() -> AsyncIterator[bytes]:
        first = 0
        if batch:
            while entries := await shell.run(command("LRANGE", lines, first,
                                                     first + _LINES_PER_READ - 1)):
                yield b"".join(bytes(entry) + b"\n" for entry in entries)
                first += len(entries)
            return
        while pieces := await shell.run(records.pieces(file_id, first, _PIECES_PER_READ)):
            for piece in pieces:
                yield piece
            first += len(pieces)

    return StreamingResponse(body(), media_type="application/octet-stream", headers={
        "content-length": meta.get("bytes", "0"),
        "content-disposition": _disposition(meta.get("filename", ""))})


def _disposition(name: str) -> str:
    """An attachment header for any file name: ASCII, and the name itself as RFC 6266's
    UTF-8 ``filename*``."""
    plain = "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in name)
    return f'attachment; filename="{plain}"; filename*=UTF-8\'\'{quote(name, safe="")}'



async def delete_file(request: Request) -> Response:
    """``DELETE /v1/files/{file_id}``."""
    file_id = request.path_params["file_id"]
    meta = await _owned(request, file_id)
    gateway = request.app.state.gateway
    await gateway.store.shell.run_all(FileRecords(gateway.keys).delete(file_id, meta["owner"]))
    return JSONResponse({"id": file_id, "object": "file", "deleted": True})


async def list_files(request: Request) -> Response:
    """``GET /v1/files?purpose=&limit=&order=&after=``: the caller's files, OpenAI's list."""
    gateway = request.app.state.gateway
    key = gateway.key(request)
    query = request.query_params
    count = limit(request, 10000, 10000)
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise GatewayError(400, "order must be 'asc' or 'desc'", param="order",
                           code="invalid_order")
    purpose = query.get("purpose")
    index = OwnerIndex.sorted_set(key.name, gateway.keys.owned_files(key.name),
                                  FileRecords(gateway.keys).meta, oldest_first=order == "asc")
    files, more = await listed(request, gateway.store.shell, index, "file", count)
    data = [file_object(file_id, meta) for file_id, meta in files
            if purpose is None or meta.get("purpose") == purpose]
    return page_response(data, more)
