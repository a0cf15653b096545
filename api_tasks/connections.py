"""Redis connections built from the settings (one pool per process)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.sentinel
import redis.cluster
import redis.sentinel
from redis._parsers import AsyncCommandsParser, CommandsParser
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.commands.core import AsyncScript, Script
from redis.exceptions import (
    ClusterDownError,
    MasterDownError,
    NoScriptError,
    RedisClusterException,
    RedisClusterUnreachableError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.retry import Retry

from api_tasks.errors import BrokerUnavailable

if TYPE_CHECKING:
    from config.cluster_url import ClusterURL
    from config.sentinel_url import SentinelURL
    from config.settings import RedisSettings

__all__ = ["BLOCK_SLICE", "UNAVAILABLE", "broker_errors", "connect", "connect_async", "is_cluster",
           "pool_size", "reason", "sentinel_options", "text", "text_map", "wait_for_cluster",
           "wait_for_redis"]

log = logging.getLogger(__name__)

# What says a Redis is out of reach for now: a connection that failed or timed out, and on a
# Redis Cluster a node that lost its slots' quorum or is taking them back (``CLUSTERDOWN``,
# ``TRYAGAIN``, ``MASTERDOWN``), no node answering, or a slot no node serves: each is waited
# out or told to the caller alike.
UNAVAILABLE: tuple[type[Exception], ...] = (
    redis.ConnectionError, redis.TimeoutError, ClusterDownError, TryAgainError, MasterDownError,
    RedisClusterUnreachableError, SlotNotCoveredError)

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
            max_connections: int = 100, quick: bool = False) -> redis.Redis:
    """A client for the configured Redis (passwords, ACL users and rediss:// come in the URL;
    a sentinel:// URL follows whichever server Sentinel names the primary).

    The default timeout suits blocking reads (``BLOCK_SLICE``); pass a shorter one
    for a client that only makes quick calls, so a hung Redis fails it fast. The pool
    holds ``max_connections``; a thread that finds them all busy waits for one (up to
    the socket timeout) instead of failing with "Too many connections". ``quick``: on a
    Redis Cluster, a node out of reach fails a call at once, not after redis-py's retries (a
    round that visits every node, the watchdog's, must not wait on a dead one).
    """
    options = _options(settings, socket_timeout, max_connections)
    if (nodes := settings.cluster) is not None:
        return _cluster(nodes, {**options, "retry": Retry(NoBackoff(), 0)} if quick
                        else options)
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
    if (nodes := settings.cluster) is not None:
        return _async_cluster(nodes, options)
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


def _cluster_options(nodes: ClusterURL, options: dict[str, Any]) -> dict[str, Any]:
    """``_options`` for a cluster client: per node, with the URL's login (the sync client's
    pool waits ``timeout`` for a free connection; the asyncio one has no such wait)."""
    options = {k: v for k, v in options.items() if k != "health_check_interval"}
    return {**options, "username": nodes.username, "password": nodes.password,
            "ssl": nodes.tls,
            # a primary down stops its own slots, not the client (with the servers'
            # cluster-require-full-coverage no, the others go on)
            "require_full_coverage": False,
            # redis-py tries a node out of reach again for seconds; the project's own
            # retries (a claim's, the event writer's) wait for a failover, so a call to a
            # dead node fails in a fraction of a second and the others go on meanwhile
            "retry": options.get("retry") or Retry(ExponentialWithJitterBackoff(base=0.05,
                                                                                cap=0.5), 2)}


class _NodeScript(Script):
    """A script on a Redis Cluster that one node lacks (restarted, new): sent whole to that
    node (``EVAL``, which keeps it there), where redis-py would load it on every primary,
    and so fail while any one of them is out of reach."""

    def __call__(self, keys: Any = None, args: Any = None, client: Any = None) -> Any:
        keys, args = list(keys or []), list(args or [])
        client = client or self.registered_client
        if not isinstance(client, redis.cluster.RedisCluster):  # (a pipeline's)
            return super().__call__(keys, args, client)
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return client.eval(cast(str, self.script), len(keys), *keys, *args)


class _AsyncNodeScript(AsyncScript):
    """``_NodeScript`` for asyncio callers."""

    async def __call__(self, keys: Any = None, args: Any = None,
                       client: Any = None) -> Any:
        keys, args = list(keys or []), list(args or [])
        client = client or self.registered_client
        if not isinstance(client, redis.asyncio.cluster.RedisCluster):
            return await super().__call__(keys, args, client)
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await client.eval(cast(str, self.script), len(keys), *keys, *args)


class _Cluster(redis.cluster.RedisCluster):
    """redis-py's cluster client, its scripts ``_NodeScript``s."""

    def register_script(self, script: Any) -> Any:
        return _NodeScript(self, script)


def _cluster(nodes: ClusterURL, options: dict[str, Any]) -> redis.Redis:
    """A Redis Cluster client, a pool per node, waiting for a free connection as ``connect``'s
    does; typed as ``redis.Redis``, whose commands it offers (the few places that differ ask
    ``is_cluster``)."""
    try:  # (it asks a node for the slots now: a cluster out of reach fails here)
        client = _Cluster(
            startup_nodes=[redis.cluster.ClusterNode(host, port)  # type: ignore[no-untyped-call]
                           for host, port in nodes.nodes],
            connection_pool_class=redis.BlockingConnectionPool,
            **_cluster_options(nodes, options))
        client.commands_parser = _Parser(client)  # type: ignore[no-untyped-call]
    except (redis.RedisError, RedisClusterException) as err:
        raise BrokerUnavailable(f"Redis is unavailable: no node of the Redis Cluster "
                                f"answered ({reason(err)})") from err
    return cast("redis.Redis", client)


def _async_cluster(nodes: ClusterURL, options: dict[str, Any]) -> redis.asyncio.Redis:
    """``_cluster`` for asyncio callers (``_AsyncCluster``)."""
    given = _cluster_options(nodes, options)
    client = _AsyncCluster(
        given.pop("max_connections"), given.pop("timeout"),
        startup_nodes=[redis.asyncio.cluster.ClusterNode(host, port)
                       for host, port in nodes.nodes], **given)
    return cast("redis.asyncio.Redis", client)


_GATED: contextvars.ContextVar[bool] = contextvars.ContextVar("api_tasks_gated", default=False)


class _AsyncCluster(redis.asyncio.cluster.RedisCluster):
    """redis-py's asyncio cluster client, but a call that finds ``bound`` calls out waits for
    one to end (up to ``wait_for`` seconds), as ``connect_async``'s pool does: redis-py's
    fails at once when a node's connections are all busy. A call or pipeline holds at most
    one connection a node, so the nodes' pools (twice as big, for redirects the client
    follows inside a call) never run out."""

    def __init__(self, bound: int, wait_for: float, **options: Any) -> None:
        super().__init__(**{**options, "max_connections": 2 * bound})
        self.bound = bound
        self.wait_for = wait_for
        self.commands_parser = _AsyncParser()
        self._gates: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop,
                                               asyncio.Semaphore] = weakref.WeakKeyDictionary()

    def register_script(self, script: Any) -> Any:
        return _AsyncNodeScript(self, script)

    @contextlib.asynccontextmanager
    async def gate(self) -> AsyncIterator[None]:
        """Hold one of the ``bound`` calls (a call made inside one holds none more)."""
        if _GATED.get():
            yield
            return
        loop = asyncio.get_running_loop()
        gate = self._gates.get(loop)
        if gate is None:
            gate = self._gates[loop] = asyncio.Semaphore(self.bound)
        try:
            async with asyncio.timeout(self.wait_for):
                await gate.acquire()
        except TimeoutError:
            raise redis.ConnectionError("no Redis connection came free in time") from None
        held = _GATED.set(True)
        try:
            yield
        finally:
            _GATED.reset(held)
            gate.release()

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self.gate():
            return await super().execute_command(*args, **kwargs)

    def pipeline(self, transaction: Any | None = None,
                 shard_hint: Any | None = None) -> redis.asyncio.cluster.ClusterPipeline:
        if shard_hint:
            raise redis.RedisError("shard_hint is not supported on a Redis Cluster")
        return _GatedPipeline(self, transaction)  # type: ignore[abstract]


class _GatedPipeline(redis.asyncio.cluster.ClusterPipeline):
    """A pipeline that holds one of its client's calls while it runs."""

    async def execute(self, raise_on_error: bool = True,
                      allow_redirections: bool = True) -> list[Any]:
        client = cast("_AsyncCluster", self.cluster_client)
        async with client.gate():
            return await super().execute(raise_on_error, allow_redirections)


def _stream_keys(args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """The keys of an ``XREAD`` (the first half of what follows ``STREAMS``); None for any
    other command. redis-py's cluster client asks the server (``COMMAND GETKEYS``) before
    every command whose keys move, which would double the reads of a job's stream."""
    if text(args[0]).upper() != "XREAD":
        return None
    words = [text(arg).upper() if isinstance(arg, (str, bytes)) else "" for arg in args]
    after = args[words.index("STREAMS") + 1:] if "STREAMS" in words else ()
    return tuple(after[:len(after) // 2]) or None


class _Parser(CommandsParser):
    """Finds an ``XREAD``'s keys itself (``_stream_keys``)."""

    def get_keys(self, redis_conn: Any, *args: Any) -> Any:
        return _stream_keys(args) or super().get_keys(redis_conn, *args)  # type: ignore[no-untyped-call]


class _AsyncParser(AsyncCommandsParser):
    """``_Parser`` for the asyncio cluster client."""

    async def get_keys(self, *args: Any) -> Any:
        return _stream_keys(args) or await super().get_keys(*args)


def is_cluster(client: redis.Redis | redis.asyncio.Redis) -> bool:
    """Whether a client from ``connect``/``connect_async`` is a Redis Cluster's."""
    return isinstance(client, (redis.cluster.RedisCluster, redis.asyncio.cluster.RedisCluster))


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
    _wait(client.ping, UNAVAILABLE, "Redis", poll, say_every)


def wait_for_cluster(settings: RedisSettings, poll: float = 0.5,
                     say_every: float = 10.0) -> None:
    """Block until a Redis Cluster the settings name answers (its client asks for the slots
    when built, so a worker waits before it builds its own, as ``wait_for_redis`` waits for
    a plain Redis); at once for any other Redis."""
    if settings.cluster is not None:
        _wait(lambda: connect(settings, socket_timeout=2.0, max_connections=2).close(),
              (BrokerUnavailable,), "the Redis Cluster", poll, say_every)


def _wait(attempt: Callable[[], object], errors: tuple[type[Exception], ...], what: str,
          poll: float, say_every: float) -> None:
    """Call ``attempt`` every ``poll`` seconds until it raises none of ``errors``, saying
    so every ``say_every`` seconds."""
    said = 0.0
    while True:
        try:
            attempt()
            return
        except errors as err:
            now = time.monotonic()
            if now - said >= say_every:
                log.warning("waiting for %s (%s)", what, err)
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
    except UNAVAILABLE as err:
        raise BrokerUnavailable(f"Redis is unavailable: {reason(err)}") from err


def reason(err: BaseException) -> str:
    """What went wrong, in a line: redis-py's own message, but for Sentinel's, which spells
    out every Sentinel client it asked."""
    said = str(err)
    if isinstance(err, redis.sentinel.MasterNotFoundError) and " : " in said:
        return said.split(" : ", 1)[0] + " (no Sentinel answered)"
    return said
