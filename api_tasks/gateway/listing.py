"""What a key sees of its own records: another key's is a 404, and its lists are OpenAI's
cursor pages (``limit``, ``after``; ``data``, ``first_id``, ``last_id``, ``has_more``)."""

from __future__ import annotations

import re
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse

from api_tasks.gateway.errors import GatewayError
from api_tasks.record.calls import AsyncShell
from api_tasks.record.job_record import Field
from api_tasks.record.store import OwnerIndex, owned_page
from config.settings import GatewayKey

__all__ = ["limit", "listed", "owned", "page", "page_response"]

T = TypeVar("T")
_DIGITS = re.compile(r"[0-9]{1,6}", re.ASCII)


def owned(record: dict[str, str], key: GatewayKey, message: str, code: str) -> dict[str, str]:
    """``record`` if it is ``key``'s; else 404, as if it did not exist."""
    if not record or record.get(Field.OWNER) != key.name:
        raise GatewayError(404, message, param="id", code=code)
    return record


def limit(request: Request, default: int, most: int) -> int:
    """The request's ``limit`` (400 unless a whole number from 1 to ``most``)."""
    given = request.query_params.get("limit", str(default))
    if not _DIGITS.fullmatch(given) or not 1 <= int(given) <= most:
        raise GatewayError(400, f"limit must be a whole number from 1 to {most}",
                           param="limit", code="invalid_limit")
    return int(given)


def page(found: T | None, after: str | None, noun: str) -> T:
    """A listing's page; 400 if ``after`` named none of the key's ``noun``s."""
    if found is None:
        raise GatewayError(400, f"after names no {noun} of yours: {after!r}", param="after",
                           code="invalid_cursor")
    return found


def page_response(data: list[dict[str, Any]], more: bool) -> JSONResponse:
    """A page of objects in OpenAI's list shape."""
    return JSONResponse({"object": "list", "data": data,
                         "first_id": data[0]["id"] if data else None,
                         "last_id": data[-1]["id"] if data else None, "has_more": more})


async def listed(request: Request, shell: AsyncShell, index: OwnerIndex, noun: str,
                 count: int) -> tuple[list[tuple[str, dict[str, str]]], bool]:
    """A page of ``count`` of the key's ``noun``s with their records, after the request's
    ``after``, and whether more may follow (400 if ``after`` names none of them)."""
    after = request.query_params.get("after") or None
    return page(await owned_page(shell, index, after, count), after, noun)
