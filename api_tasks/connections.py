"""Redis connections built from the settings (one pool per process)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel

from api_tasks.errors import BrokerUnavailable

if TYPE_CHECKING:
    from config.sentinel_url import SentinelURL
    from config.settings import RedisSettings

__all__ = ["BLOCK_SLICE", "broker_errors", "connect", "connect_async", "pool_size", "reason",
           "sentinel_options", "text", "text_map", "wait_for_redis"]

log = logging.getLogger(__name__)

# Blocking reads wait in slices this long, well under the socket timeout,
# so a dead connection is noticed and a caller's deadline is honoured.
BLOCK_SLICE = 5.0


try:  # redis-py 8 looks its own version up on disk for every new connection unless told
    from redis.driver_info import DriverInfo
    _DRIVER: dict[str, Any] = {"driver_info": DriverInfo()}
except ImportError:  # older redis-py: nothing to save
    _DRIVER = {}


def _options(settings: RedisSettings, socket_timeout: float,
             max_connections: int) -> dict[str, Any]:
    """The pool options both clients share."""
    return {
        **_DRIVER,
        "max_connections": max_connections,
        "timeout": socket_timeout,
        "protocol": 2,  # stable reply shapes whatever redis-py's default becomes
        "socket_connect_timeout": settings.socket_connect_timeout,
        "socket_timeout": socket_timeout,
        "socket_keepalive": True,
        "health_check_interval": settings.health_check_interval,
        "decode_responses": False,
    }


class _SentinelPool(redis.sentinel.SentinelConnectionPool, redis.BlockingConnectionPool):
    """Sentinel's pool for the primary, waiting for a free connection as ``connect``'s does."""


class _AsyncSentinelPool(redis.asyncio.sentinel.SentinelConnectionPool,
                         redis.asyncio.BlockingConnectionPool):
    """``_SentinelPool`` for asyncio callers."""


def sentinel_options(settings: RedisSettings, where: SentinelURL) -> dict[str, Any]:
    """How to reach the Sentinels (for the project's pools and the broker's alike): their own
    credentials, and the connect timeout for every reply.

    Each new connection asks a Sentinel where the primary is, so after a failover the
    next connection goes to the promoted replica; one to the old primary fails or is
    refused as read-only, and is dropped.
    """
    credentials = {"username": where.sentinel_username, "password": where.sentinel_password}
    timeout = settings.socket_connect_timeout
    return {"socket_connect_timeout": timeout, "socket_keepalive": True, "protocol": 2,
            # a Sentinel answers at once: one that hangs is passed over as fast as one down
            "socket_timeout": timeout,
            **{k: v for k, v in credentials.items() if v is not None}}


def _primary(where: SentinelURL, options: dict[str, Any]) -> dict[str, Any]:
    return {**options, "db": where.db, "username": where.username, "password": where.password}


def connect(settings: RedisSettings, socket_timeout: float = BLOCK_SLICE + 10.0,
            max_connections: int = 100) -> redis.Redis:
    """A client for the configured Redis (passwords, ACL users and rediss:// come in the URL;
    a sentinel:// URL follows whichever server Sentinel names the primary).

    The default timeout suits blocking reads (``BLOCK_SLICE``); pass a shorter one
    for a client that only makes quick calls, so a hung Redis fails it fast. The pool
    holds ``max_connections``; a thread that finds them all busy waits for one (up to
    the socket timeout) instead of failing with "Too many connections".
    """
    options = _options(settings, socket_timeout, max_connections)
    where = settings.sentinel
    if where is None:
        pool: redis.BlockingConnectionPool = redis.BlockingConnectionPool.from_url(
            settings.url, **options)
    else:
        manager = redis.sentinel.Sentinel(where.nodes,
                                          sentinel_kwargs=sentinel_options(settings, where))
        pool = _SentinelPool(where.master, manager,  # type: ignore[no-untyped-call]
                             **_primary(where, options))
    return redis.Redis(connection_pool=pool)


def connect_async(settings: RedisSettings, socket_timeout: float = BLOCK_SLICE + 10.0,
                  max_connections: int = 100) -> redis.asyncio.Redis:
    """``connect`` for asyncio callers (the HTTP gateway): the same options and bounds, and
    at most ``CONNECTING`` connections being opened at once."""
    options = _options(settings, socket_timeout, max_connections)
    where = settings.sentinel
    if where is None:
        pool: redis.asyncio.BlockingConnectionPool = \
            redis.asyncio.BlockingConnectionPool.from_url(settings.url, **options)
    else:
        manager = redis.asyncio.sentinel.Sentinel(
            where.nodes, sentinel_kwargs=sentinel_options(settings, where))
        pool = _AsyncSentinelPool(where.master, manager,  # type: ignore[no-untyped-call]
                                  **_primary(where, options))
    chosen = pool.connection_class  # plain, TLS or Unix socket, from the URL
    pool.connection_class = type(f"Paced{chosen.__name__}", (_PacedConnect, chosen), {})
    return redis.asyncio.Redis(connection_pool=pool)


CONNECTING = 32
_gates: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = \
    weakref.WeakKeyDictionary()


class _PacedConnect:
    """Opens connections a few at a time: two thousand readers arriving at once would
    overflow Redis's accept backlog (511), and the connects dropped there time out."""

    is_connected: bool
    socket_connect_timeout: float | None

    async def connect(self) -> None:
        if self.is_connected:
            return
        loop = asyncio.get_running_loop()
        gate = _gates.get(loop)
        if gate is None:
            gate = _gates[loop] = asyncio.Semaphore(CONNECTING)
        try:  # a Redis that cannot be reached fails the line as fast as one connect would
            async with asyncio.timeout(self.socket_connect_timeout or BLOCK_SLICE):
                await gate.acquire()
        except TimeoutError:
            raise redis.ConnectionError("Timeout waiting to connect to Redis") from None
        try:
            await super().connect()  # type: ignore[misc]
        finally:
            gate.release()


def pool_size(concurrency: int) -> int:
    """Connections a worker process needs: one per job thread, plus its own threads'."""
    return concurrency + 16


def wait_for_redis(client: redis.Redis, poll: float = 0.5, say_every: float = 10.0) -> None:
    """Block until Redis answers, saying so now and then (a worker waits; it never exits).

    Celery's own reconnect backs off to 30 s between tries; polling here lets a
    worker started before Redis begin consuming within a second of Redis coming up.
    """
    said = 0.0
    while True:
        try:
            client.ping()
            return
        except (redis.ConnectionError, redis.TimeoutError) as err:
            now = time.monotonic()
            if now - said >= say_every:
                log.warning("waiting for Redis (%s)", err)
                said = now
            time.sleep(poll)


def text(value: Any) -> str:
    """A Redis reply (bytes, as the clients here don't decode) as a string."""
    return value.decode() if isinstance(value, bytes) else str(value)


def text_map(reply: Any) -> dict[str, str]:
    """An ``HGETALL`` reply as a dict of strings (empty if the hash does not exist)."""
    return {text(k): text(v) for k, v in reply.items()}


@contextlib.contextmanager
def broker_errors() -> Iterator[None]:
    """Raise a Redis connection failure as ``BrokerUnavailable``, with its reason."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as err:
        raise BrokerUnavailable(f"Redis is unavailable: {reason(err)}") from err


def reason(err: BaseException) -> str:
    """What went wrong, in a line: redis-py's own message, but for Sentinel's, which spells
    out every Sentinel client it asked."""
    said = str(err)
    if isinstance(err, redis.sentinel.MasterNotFoundError) and " : " in said:
        return said.split(" : ", 1)[0] + " (no Sentinel answered)"
    return said
