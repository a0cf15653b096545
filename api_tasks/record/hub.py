"""Waiting readers share one pub/sub connection per process (``EventHub``).

A reader waiting on a job's stream with ``XREAD BLOCK`` holds a Redis connection for as long
as it waits: two thousand readers of one gateway held two thousand, opened all at once.
Here a process subscribes once per job to the channel every event is published on
(``Keys.channel``), on one connection, and each reader hears what came since it last looked.
The stream stays the record: a reader reads it (without blocking, on a pooled connection
for that one call) when it starts, when what it heard does not follow on from what it has,
and when it heard more than it may hold while it was busy.

Nothing here sets a timer per event: a reader's wait ends at a deadline the hub keeps in a
heap under one timer, and the connection is read without a timeout (a PING every few quiet
seconds shows it alive). An ``asyncio.timeout`` per wait and per reply cost a fifth of a
gateway's CPU relaying live streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import os
import random
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, cast

import redis
import redis.asyncio
import redis.asyncio.cluster

from api_tasks.connections import is_cluster

__all__ = ["HELD", "HUB_NAME", "EventHub", "Heard"]

log = logging.getLogger(__name__)

HUB_NAME = "api_tasks-hub"  # the connection's client name, then "-<pid>"
HELD = 256  # events a reader holds unheard; past it they are dropped and it reads the stream
_PING = 5.0  # seconds of quiet before a ping shows the connection is still alive
_LINGER = 10.0  # seconds the connection stays open with nobody following


class Heard:
    """What one reader heard on its job's channel since it last took it."""

    __slots__ = ("closed", "deadline", "due", "events", "lost", "timed_out", "waiting", "wake")

    def __init__(self) -> None:
        self.events: list[bytes] = []
        self.lost = False  # some were dropped: the stream has them
        self.closed = False  # the connection broke: follow again
        self.wake = asyncio.Event()
        self.waiting = False  # in ``EventHub.wait``
        self.timed_out = False  # that wait ended at its deadline
        self.deadline = 0.0  # when that wait ends (loop time)
        self.due: float | None = None  # when the hub looks at it next (its heap entry)

    def add(self, payload: bytes) -> None:
        """One more event (the oldest are dropped, and ``lost`` set, past ``HELD``)."""
        if len(self.events) >= HELD:
            self.events.clear()
            self.lost = True
        else:
            self.events.append(payload)
        self.wake.set()

    def take(self) -> list[bytes]:
        """The events heard since the last take."""
        events, self.events = self.events, []
        self.wake.clear()
        return events

    def reset(self) -> None:
        """Forget what was heard: the caller is about to read the stream."""
        self.events.clear()
        self.lost = False
        self.wake.clear()

    def close(self) -> None:
        self.closed = self.lost = True
        self.events.clear()
        self.wake.set()


class _Channel:
    """A subscribed channel: its readers, and whether Redis confirmed the subscription."""

    __slots__ = ("followers", "ready")

    def __init__(self) -> None:
        self.followers: set[Heard] = set()
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()


class EventHub:
    """One pub/sub connection, opened on first use, that every reader of a process shares."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self._redis = client
        self._channels: dict[bytes, _Channel] = {}
        # per channel, the SUBSCRIBE (its _Channel) and UNSUBSCRIBE (None) Redis has yet to
        # confirm, in the order sent: a reader may read the stream once its SUBSCRIBE is in
        self._unconfirmed: dict[bytes, deque[_Channel | None]] = {}
        self._connected: asyncio.Future[Any] | None = None
        self._listener: asyncio.Task[None] | None = None
        # waiting readers by when the hub looks at them next, under one timer
        self._due: list[tuple[float, int, Heard]] = []
        self._order = itertools.count()  # ties in the heap never compare two Heards
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the one the heap's timer is on
        self._heard_at = 0.0  # loop time of the connection's last reply
        self._busy_at = 0.0  # and of its last one that was not a PONG

    async def wait(self, heard: Heard, seconds: float) -> bool:
        """Until ``heard`` hears something (True) or ``seconds`` pass (False)."""
        if heard.wake.is_set():
            return True
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a hub used from a new loop: the old one's timer is dead
            self._loop, self._timer = loop, None
            self._due.clear()
        heard.deadline = loop.time() + seconds
        # a reader keeps one entry: one due before its deadline is looked at and moved on
        if heard.due is None or heard.due > heard.deadline:
            heard.due = heard.deadline
            heapq.heappush(self._due, (heard.deadline, next(self._order), heard))
            if self._timer is None or self._timer.when() > heard.deadline:
                self._arm(loop)
        heard.waiting, heard.timed_out = True, False
        try:
            await heard.wake.wait()
        finally:
            heard.waiting = False
        return not heard.timed_out

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(self._due[0][0], self._expire, loop) if self._due else None

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        """End the waits whose deadline passed; move on the entries of readers whose
        deadline moved since."""
        now = loop.time()
        while self._due and self._due[0][0] <= now:
            due, _, heard = heapq.heappop(self._due)
            if heard.due != due:
                continue  # an earlier entry took its place
            heard.due = None
            if not heard.waiting:
                continue  # it waits no more: its next wait makes a new entry
            if heard.deadline > now:
                heard.due = heard.deadline
                heapq.heappush(self._due, (heard.deadline, next(self._order), heard))
            elif not heard.wake.is_set():  # not heard something just before
                heard.timed_out = True
                heard.wake.set()
        self._timer = None
        self._arm(loop)

    @contextlib.asynccontextmanager
    async def follow(self, channel: str) -> AsyncIterator[Heard]:
        """Hear what is published on ``channel`` from when this enters (its subscription
        confirmed) until it exits; ``redis.ConnectionError`` if Redis cannot be reached."""
        name = channel.encode()
        heard = Heard()
        conn = await self._connection()
        entry = self._channels.get(name)
        if entry is None:
            entry = self._channels[name] = _Channel()
            self._unconfirmed.setdefault(name, deque()).append(entry)
            subscribe = True
        else:
            subscribe = False
        entry.followers.add(heard)
        try:
            if subscribe:
                await _send(conn, "SUBSCRIBE", name)
            try:
                async with asyncio.timeout(_PING):
                    await asyncio.shield(entry.ready)
            except TimeoutError:
                raise redis.ConnectionError("Redis did not confirm a subscription") from None
            yield heard
        finally:
            entry.followers.discard(heard)
            if not entry.followers and self._channels.get(name) is entry:
                del self._channels[name]
                self._unconfirmed.setdefault(name, deque()).append(None)
                with contextlib.suppress(redis.RedisError, OSError, TimeoutError):
                    await _send(conn, "UNSUBSCRIBE", name)

    async def _connection(self) -> Any:
        if self._connected is None:
            self._connected = asyncio.get_running_loop().create_future()
            # held here: the loop keeps only a weak reference to a task
            self._listener = asyncio.get_running_loop().create_task(self._run(self._connected))
        return await asyncio.shield(self._connected)

    async def _run(self, connected: asyncio.Future[Any]) -> None:
        """Connect, then dispatch what the connection brings until it breaks or lingers idle;
        then every reader is told to follow again."""
        failure: BaseException = redis.ConnectionError("the event connection closed")
        conn: Any = None
        try:
            kind, options = await _plain_connection(self._redis)
            # named, so CLIENT LIST tells which process each subscription connection serves
            conn = kind(**{**options, "health_check_interval": 0,
                           "client_name": f"{HUB_NAME}-{os.getpid()}"})
            await conn.connect()
            # then read with no timeout (a timer per reply): _listen's pings show it alive,
            # and each send has a timeout of its own (_send)
            conn.socket_timeout = None
            connected.set_result(conn)
            await self._listen(conn)
        except BaseException as err:
            failure = err
            if not isinstance(err, (redis.RedisError, OSError, asyncio.CancelledError)):
                log.exception("event hub: unexpected error")
            if isinstance(err, asyncio.CancelledError):
                raise
        finally:
            self._connected = None
            if not connected.done():
                connected.set_exception(_as_connection_error(failure))
            for entry in self._channels.values():
                if not entry.ready.done():
                    entry.ready.set_exception(_as_connection_error(failure))
                    entry.ready.exception()  # retrieved here: nobody may be waiting
                for heard in entry.followers:
                    heard.close()
            self._channels.clear()
            self._unconfirmed.clear()
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.disconnect(nowait=True)

    async def _listen(self, conn: Any) -> None:
        """Dispatch what comes until the connection breaks (raised), Redis leaves a PING
        unanswered (raised), or nobody has followed for ``_LINGER`` seconds (returns)."""
        loop = asyncio.get_running_loop()
        self._heard_at = self._busy_at = loop.time()
        reading = loop.create_task(self._dispatch(conn, loop))
        pinged: float | None = None
        try:
            while True:
                done, _ = await asyncio.wait({reading}, timeout=_PING)
                if done:
                    reading.result()  # raises what broke the connection
                    return
                now = loop.time()
                if pinged is not None and self._heard_at < pinged:
                    raise redis.ConnectionError("Redis did not answer a ping")
                if not self._channels and not self._unconfirmed and \
                        now - self._busy_at >= _LINGER:
                    return
                pinged = None
                if now - self._heard_at >= _PING:
                    pinged = now
                    await _send(conn, "PING")
        finally:
            reading.cancel()
            await asyncio.wait({reading})  # a cancel of this task itself still goes through
            if not reading.cancelled():
                reading.exception()  # retrieved: raised above, or moot once this one ended

    async def _dispatch(self, conn: Any, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            reply = await conn.read_response(disconnect_on_error=False)
            self._heard_at = loop.time()
            if isinstance(reply, bytes) or reply[0] == b"pong":  # b"PONG" once unsubscribed
                continue
            kind, name = reply[0], reply[1]
            self._busy_at = self._heard_at
            if kind == b"message":
                entry = self._channels.get(name)
                if entry is not None:
                    for heard in entry.followers:
                        heard.add(reply[2])
            elif kind in (b"subscribe", b"unsubscribe"):
                waiting = self._unconfirmed.get(name)
                sent = waiting.popleft() if waiting else None
                if waiting is not None and not waiting:
                    del self._unconfirmed[name]
                if sent is not None and not sent.ready.done():
                    sent.ready.set_result(None)


async def _send(conn: Any, *args: Any) -> None:
    """Send a command on the hub's connection, which has no timeout of its own."""
    try:
        async with asyncio.timeout(_PING):
            await conn.send_command(*args, check_health=False)
    except TimeoutError:
        raise redis.ConnectionError(f"Redis took no {args[0]} for {_PING:g}s") from None


async def _plain_connection(client: redis.asyncio.Redis) -> tuple[Any, dict[str, Any]]:
    """The class and options of a plain connection to the client's Redis; on a Redis Cluster
    to any primary (a classic ``PUBLISH`` reaches the subscribers on every node)."""
    if is_cluster(client):
        cluster = cast("redis.asyncio.cluster.RedisCluster", client)
        await cluster.initialize()
        node = random.choice(cluster.get_primaries())
        return node.connection_class, node.connection_kwargs
    return client.connection_pool.connection_class, client.connection_pool.connection_kwargs


def _as_connection_error(err: BaseException) -> redis.ConnectionError:
    if isinstance(err, redis.ConnectionError):
        return err
    return redis.ConnectionError(f"the event connection failed: {err!r}")
