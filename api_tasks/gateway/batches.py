"""OpenAI's Batches API on the gateway: create a batch from an uploaded file, read, list and
cancel a key's batches. The workers run them (``batches.pump``)."""

from __future__ import annotations

from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from api_tasks.batches.api_batches import (
    COMPLETION_WINDOW,
    BatchRecords,
    batch_event,
    batch_object,
)
from api_tasks.batches.files import FileRecords, Purpose
from api_tasks.batches.state import ENDED, BatchStatus
from api_tasks.gateway.errors import GatewayError
from api_tasks.gateway.listing import limit, listed, owned, page_response
from api_tasks.record.store import OwnerIndex
from api_tasks.spec import KINDS
from config.settings import FILE_TTL_RANGE

__all__ = ["cancel_batch", "create_batch", "get_batch", "list_batches"]



def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > 16 or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
            for k, v in value.items()):
        raise GatewayError(400, "metadata must be at most 16 string pairs (keys up to 64 "
                           "characters, values up to 512)", param="metadata",
                           code="invalid_metadata")
    return value


def _output_ttl(value: Any, default: int) -> int:
    if value is None:
        return default
    low, high = FILE_TTL_RANGE
    if not isinstance(value, dict) or value.get("anchor") != "created_at":
        raise GatewayError(400, "output_expires_after must be {\"anchor\": \"created_at\", "
                           "\"seconds\": N}", param="output_expires_after.anchor",
                           code="invalid_expires_after")
    seconds = value.get("seconds")
    if not isinstance(seconds, int) or isinstance(seconds, bool) or not low <= seconds <= high:
        raise GatewayError(400, f"output_expires_after.seconds must be a whole number from "
                           f"{low} to {high}", param="output_expires_after.seconds",
                           code="invalid_expires_after")
    return seconds


async def create_batch(request: Request) -> Response:
    """``POST /v1/batches``: a batch on an uploaded file, ``validating`` at first."""
    gateway = request.app.state.gateway
    key = gateway.key(request)
    body, _ = await gateway.body(request)
    endpoint = body.get("endpoint")
    if endpoint not in KINDS:
        raise GatewayError(400, f"endpoint must be one of {', '.join(KINDS)}",
                           param="endpoint", code="invalid_endpoint")
    if body.get("completion_window") != COMPLETION_WINDOW:
        raise GatewayError(400, "completion_window must be '24h'", param="completion_window",
                           code="invalid_completion_window")
    metadata = _metadata(body.get("metadata"))
    output_ttl = _output_ttl(body.get("output_expires_after"),
                             gateway.settings.files.default_ttl)
    file_id = body.get("input_file_id")
    if not isinstance(file_id, str) or not file_id:
        raise GatewayError(400, "input_file_id must name an uploaded file",
                           param="input_file_id", code="invalid_input_file")
    shell = gateway.store.shell
    meta = await shell.run(FileRecords(gateway.keys).meta(file_id))
    if meta.get("owner") != key.name:
        raise GatewayError(404, f"No such File object: {file_id}", param="input_file_id",
                           code="file_not_found")
    if meta.get("purpose") != Purpose.BATCH:
        raise GatewayError(400, f"file {file_id} has purpose {meta.get('purpose')!r}, not "
                           "'batch'", param="input_file_id", code="invalid_input_file")
    settings = gateway.settings
    batch_id, state, writes = BatchRecords(gateway.keys).create(
        key.name, file_id, meta.get("filename", ""), endpoint, metadata, output_ttl,
        settings.gateway.batch_window, settings.gateway.batch_lifetime,
        settings.jobs.queued_ttl)
    with anyio.CancelScope(shield=True):  # made, it is indexed whatever the client does
        await shell.write(writes)
    return JSONResponse(batch_object(batch_id, state))


async def _owned(request: Request, batch_id: str) -> dict[str, str]:
    """The hash of a batch of the caller's key (404 for any other, as if it did not exist)."""
    gateway = request.app.state.gateway
    return owned(await gateway.store.shell.run(BatchRecords(gateway.keys).state(batch_id)),
                 gateway.key(request), f"No such Batch object: {batch_id}", "batch_not_found")


async def get_batch(request: Request) -> Response:
    """``GET /v1/batches/{batch_id}``."""
    batch_id = request.path_params["batch_id"]
    return JSONResponse(batch_object(batch_id, await _owned(request, batch_id)))


async def cancel_batch(request: Request) -> Response:
    """``POST /v1/batches/{batch_id}/cancel``: ``cancelling`` (a batch still validating ends
    ``cancelled`` at once); a batch already cancelling or cancelled comes back as it is, an
    ended one is a 409."""
    batch_id = request.path_params["batch_id"]
    state = await _owned(request, batch_id)
    if state.get("status") in ENDED and state.get("status") != BatchStatus.CANCELLED:
        raise GatewayError(409, f"batch {batch_id} has already ended "
                           f"({state.get('status')})", param="id", code="batch_ended")
    gateway = request.app.state.gateway
    records = BatchRecords(gateway.keys)
    first, *after = records.cancel(batch_id, batch_event(
        gateway.keys, gateway.settings, state["owner"], "batch.cancelled", batch_id))
    await gateway.store.shell.run_then(first, after)
    return JSONResponse(batch_object(batch_id, await _owned(request, batch_id)))


async def list_batches(request: Request) -> Response:
    """``GET /v1/batches?after=&limit=``: the caller's batches, newest first."""
    gateway = request.app.state.gateway
    key = gateway.key(request)
    count = limit(request, 20, 100)
    index = OwnerIndex.sorted_set(key.name, gateway.keys.owned_batches(key.name),
                                  BatchRecords(gateway.keys).state)
    batches, more = await listed(request, gateway.store.shell, index, "batch", count)
    return page_response([batch_object(batch_id, state) for batch_id, state in batches], more)
