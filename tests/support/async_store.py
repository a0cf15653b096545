"""Running asyncio record code in a test: a fresh event loop with its own client and store."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from api_tasks.connections import connect_async
from api_tasks.record.keys import Keys
from api_tasks.record.store import AsyncJobStore
from config.settings import Settings

__all__ = ["run_with_store"]

T = TypeVar("T")


def run_with_store(settings: Settings, body: Callable[[AsyncJobStore], Awaitable[T]],
                   pool: int = 8) -> T:
    """Run ``body`` on a fresh event loop with an ``AsyncJobStore`` on a client of its own,
    whose pool holds ``pool`` connections."""
    async def main() -> T:
        client = connect_async(settings.redis.state(), max_connections=pool)
        try:
            keys = Keys.of(settings)
            return await body(AsyncJobStore(client, keys, settings.jobs.result_ttl,
                                            settings.jobs.queued_ttl))
        finally:
            await client.aclose()
    return asyncio.run(main())
