"""Workers' liveness records: each worker process says it is alive every few seconds, so a
probe (the gateway's ``/readyz``) learns which workers live from Redis alone, at no cost to
them. Calls as data (``record.calls``), for the sync worker and the asyncio gateway."""

from __future__ import annotations

import json
import time
from typing import Any

from api_tasks.connections import text
from api_tasks.record.calls import Call, command
from api_tasks.record.keys import Keys

__all__ = ["HEARTBEAT_EVERY", "STALE_AFTER", "alive", "beat", "gone", "records"]

HEARTBEAT_EVERY = 2.0  # seconds between two records of one worker
STALE_AFTER = 3 * HEARTBEAT_EVERY  # a worker not heard of for this long is taken for gone
_INDEX_TTL = 86400


def beat(keys: Keys, worker_id: str, info: dict[str, Any], now: float | None = None,
         tidy: bool = True) -> list[Call[Any]]:
    """The calls that record ``worker_id`` alive now (``info``: what a probe shows of it);
    with ``tidy``, the index also drops the workers gone and has its TTL set again (every few
    beats is enough: readers look at a window of time)."""
    now = time.time() if now is None else now
    record = json.dumps({**info, "id": worker_id, "seen_at": now}, separators=(",", ":"))
    ttl_ms = int(STALE_AFTER * 1000)
    calls: list[Call[Any]] = [command("SET", keys.worker(worker_id), record, "PX", ttl_ms),
                              command("ZADD", keys.workers(), int(now * 1000), worker_id)]
    if tidy:
        calls += [command("ZREMRANGEBYSCORE", keys.workers(), "-inf",
                          int((now - STALE_AFTER) * 1000)),
                  command("EXPIRE", keys.workers(), _INDEX_TTL)]
    return calls


def gone(keys: Keys, worker_id: str) -> list[Call[Any]]:
    """The calls that take a stopping worker's record out."""
    return [command("DEL", keys.worker(worker_id)), command("ZREM", keys.workers(), worker_id)]


def alive(keys: Keys, now: float | None = None) -> Call[list[str]]:
    """The ids of the workers heard of within ``STALE_AFTER`` seconds."""
    now = time.time() if now is None else now
    return command("ZRANGEBYSCORE", keys.workers(), int((now - STALE_AFTER) * 1000), "+inf",
                   parse=lambda reply: [text(member) for member in reply])


def records(keys: Keys, worker_ids: list[str]) -> Call[list[dict[str, Any]]]:
    """What those workers last said of themselves (host, pid, concurrency, seen_at); a record
    that lapsed meanwhile is left out."""
    return command("MGET", *[keys.worker(worker_id) for worker_id in worker_ids],
                   parse=lambda reply: [json.loads(raw) for raw in reply if raw])
