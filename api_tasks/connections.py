"""Redis connections built from the settings (one pool per process)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import redis

if TYPE_CHECKING:
    from config.settings import RedisSettings

__all__ = ["BLOCK_SLICE", "connect"]

# Blocking reads wait in slices this long, well under the socket timeout,
# so a dead connection is noticed and a caller's deadline is honoured.
BLOCK_SLICE = 5.0


def connect(settings: RedisSettings) -> redis.Redis:
    """A client for the configured Redis (passwords, ACL users and rediss:// come in the URL)."""
    return redis.Redis.from_url(
        settings.url,
        protocol=2,  # stable reply shapes whatever redis-py's default becomes
        socket_connect_timeout=settings.socket_connect_timeout,
        socket_timeout=BLOCK_SLICE + 10.0,
        socket_keepalive=True,
        health_check_interval=settings.health_check_interval,
        decode_responses=False,
    )
