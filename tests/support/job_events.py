"""A job's events as the gateway's ``/v1/jobs/{id}/events`` sends them, read with httpx."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx

__all__ = ["FINAL", "iter_events", "read_events"]

FINAL = ("done", "error", "cancelled")


def iter_events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """Each event of an SSE response as it arrives, with its ``id``, up to the final one."""
    current: dict[str, Any] = {}
    for line in response.iter_lines():
        if line.startswith("id: "):
            current["id"] = line[4:]
        elif line.startswith("data: "):
            current.update(json.loads(line[6:]))
        elif not line and current:
            yield current
            if current["type"] in FINAL:
                return
            current = {}


def read_events(response: httpx.Response, stop_after: int | None = None) -> list[dict[str, Any]]:
    """The events of an SSE response, up to the final one (or ``stop_after`` of them)."""
    events: list[dict[str, Any]] = []
    for event in iter_events(response):
        events.append(event)
        if len(events) == stop_after:
            break
    return events
