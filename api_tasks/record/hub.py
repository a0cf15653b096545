"""Waiting readers share one pub/sub connection per process (``EventHub``).

A reader waiting on a job's stream with ``XREAD BLOCK`` holds a Redis connection for as long
as it waits: two thousand readers of one gateway held two thousand, opened all at once.
Here a process subscribes once per job to the channel every event is published on
(``Keys.channel``), on one connection, and each reader hears what came since it last looked.
The stream stays the record: a reader reads it (without blocking, on a pooled connection
for that one call) when it starts, when what it heard does not follow on from what it has,
and when it heard more than it may hold while it was busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import redis
import redis.asyncio

__all__ = ["HELD", "HUB_NAME", "EventHub", "Heard"]

log = logging.getLogger(__name__)

HUB_NAME = "api_tasks-hub"  # the connection's client name, then "-<pid>"
HELD = 256  # events a reader holds unheard; past it they are dropped and it reads the stream
_PING = 5.0  # seconds of quiet before a ping shows the connection is still alive
_LINGER = 10.0  # seconds the connection stays open with nobody following


class Heard:
    """What one reader heard on its job's channel since it last took it."""

    __slots__ = ("closed", "events", "lost", "wake")

    def __init__(self) -> None:
        self.events: list[bytes] = []
        self.lost = False  # some were dropped: the stream has them
        self.closed = False  # the connection broke: follow again
        self.wake = asyncio.Event()

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
        self._pool = client.connection_pool
        self._channels: dict[bytes, _Channel] = {}
        # per channel, the SUBSCRIBE (its _Channel) and UNSUBSCRIBE (None) Redis has yet to
        # confirm, in the order sent: a reader may read the stream once its SUBSCRIBE is in
        self._unconfirmed: dict[bytes, deque[_Channel | None]] = {}
        self._connected: asyncio.Future[Any] | None = None
        self._listener: asyncio.Task[None] | None = None

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
                await conn.send_command("SUBSCRIBE", name, check_health=False)
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
                with contextlib.suppress(redis.RedisError, OSError):
                    await conn.send_command("UNSUBSCRIBE", name, check_health=False)

    async def _connection(self) -> Any:
        if self._connected is None:
            self._connected = asyncio.get_running_loop().create_future()
            # held here: the loop keeps only a weak reference to a task
            self._listener = asyncio.get_running_loop().create_task(self._run(self._connected))
        return await asyncio.shield(self._connected)

    async def _run(self, connected: asyncio.Future[Any]) -> None:
        """Connect, then dispatch what the connection brings until it breaks or lingers idle;
        then every reader is told to follow again."""
        # named, so CLIENT LIST tells which process each subscription connection serves
        kwargs = {**self._pool.connection_kwargs, "health_check_interval": 0,
                  "client_name": f"{HUB_NAME}-{os.getpid()}"}
        conn = self._pool.connection_class(**kwargs)
        failure: BaseException = redis.ConnectionError("the event connection closed")
        try:
            await conn.connect()  # type: ignore[no-untyped-call]
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
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)

    async def _listen(self, conn: Any) -> None:
        pinged = False
        quiet = 0.0
        while True:
            reply = await conn.read_response(timeout=_PING, disconnect_on_error=False)
            if reply is None:  # nothing for _PING seconds
                if pinged:
                    raise redis.ConnectionError("Redis did not answer a ping")
                quiet += _PING
                if not self._channels and not self._unconfirmed and quiet >= _LINGER:
                    return
                await conn.send_command("PING", check_health=False)
                pinged = True
                continue
            pinged = False
            if isinstance(reply, bytes) or reply[0] == b"pong":  # b"PONG" once unsubscribed
                continue
            kind, name = reply[0], reply[1]
            quiet = 0.0
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


def _as_connection_error(err: BaseException) -> redis.ConnectionError:
    if isinstance(err, redis.ConnectionError):
        return err
    return redis.ConnectionError(f"the event connection failed: {err!r}")
