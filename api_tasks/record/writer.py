"""Group commit: one thread per process writes every job's events to Redis.

One XADD or PUBLISH per chunk costs a round trip and caps a process at a few
thousand chunks a second. Instead jobs hand their commands to this writer,
which takes everything queued since its last flush and sends it as one
pipeline: under load, chunks that arrive together are written together; when
idle, a command goes out at once. A single writer also keeps each job's
commands in the order they were given.

The queue is bounded (``max_pending_bytes``): a job thread that hands over
more while the writer is behind waits, so a fast upstream slows to what Redis
takes instead of growing the worker's memory.

Stream entries carry ids we chose, so re-sending a batch after a connection
error cannot add an entry twice (Redis refuses the smaller-or-equal id and we
ignore that refusal).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import hiredis
import redis
from redis.exceptions import NoScriptError

from api_tasks.connections import reason
from api_tasks.record.scripts import named, script

__all__ = ["Command", "EventWriter"]

log = logging.getLogger(__name__)
Command = tuple[Any, ...]
_Item = tuple[Sequence[Command], "Future[list[Any]] | None", int]
_DUPLICATE_ID = "equal or smaller than the target stream top item"
_MAX_PENDING = 16 * 1024 * 1024  # bytes of commands queued or being written, per process


class EventWriter:
    """A background thread that pipelines queued Redis commands."""

    def __init__(self, client: redis.Redis, max_batch: int = 2000,
                 retry_for: float = 120.0, max_pending_bytes: int = _MAX_PENDING) -> None:
        self._redis = client
        self._max_batch = max_batch
        self._retry_for = retry_for
        self._max_pending = max_pending_bytes
        self._pending = 0  # bytes queued or in the pipeline being written
        self._queue: deque[_Item] = deque()
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)  # the writer waits here for work
        self._room = threading.Condition(self._lock)  # job threads wait here for room
        self._waiting = 0  # job threads waiting for room
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="api-tasks-writer", daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def submit(self, commands: Sequence[Command], wait: bool = False,
               timeout: float | None = None, size: int | None = None) -> Future[list[Any]] | None:
        """Queue commands; with ``wait``, return a future done once they are in Redis.

        Blocks while the writer is more than ``max_pending_bytes`` behind (at most
        ``timeout`` seconds, then ``TimeoutError``; the writer gives up on a down Redis
        after ``retry_for``, so even without one the wait ends). ``size``: the bytes the
        commands hold, if the caller knows (else they are counted).
        """
        future: Future[list[Any]] | None = Future() if wait else None
        if size is None:
            size = _size(commands)
        with self._lock:
            if self._pending > 0 and self._pending + size > self._max_pending:
                self._wait_for_room(size, timeout)
            self._pending += size
            self._queue.append((commands, future, size))
            self._ready.notify()
        return future

    def _wait_for_room(self, size: int, timeout: float | None) -> None:
        """With the lock held: wait until the writer has caught up enough."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._waiting += 1
        try:
            while self._pending > 0 and self._pending + size > self._max_pending \
                    and not self._closed:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError("the event writer is too far behind")
                self._room.wait(left)
        finally:
            self._waiting -= 1

    def write(self, commands: Sequence[Command], timeout: float | None = None) -> list[Any]:
        """Queue commands, block until Redis ran them, return their replies (or raise)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        future = self.submit(commands, wait=True, timeout=timeout)
        assert future is not None
        return future.result(None if deadline is None else max(deadline - time.monotonic(), 0))

    def close(self, timeout: float = 10.0) -> None:
        """Flush what is queued, then stop."""
        with self._lock:
            self._closed = True
            self._ready.notify_all()
            self._room.notify_all()
        self._thread.join(timeout)

    def _take(self) -> list[_Item]:
        with self._ready:
            while not self._queue and not self._closed:
                self._ready.wait()
            batch = []
            count = 0
            while self._queue and count < self._max_batch:
                item = self._queue.popleft()
                batch.append(item)
                count += len(item[0])
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                return
            try:
                self._flush(batch)
            except Exception as err:  # the thread must outlive any one bad batch
                log.exception("event writer: batch failed")
                _fail(batch, err)
            finally:
                with self._lock:
                    self._pending -= sum(size for _, _, size in batch)
                    if self._waiting:
                        self._room.notify_all()

    def _flush(self, batch: list[_Item]) -> None:
        deadline = time.monotonic() + self._retry_for
        delay = 0.05
        while True:
            try:
                results = self._execute(batch)
            except (redis.ConnectionError, redis.TimeoutError) as err:
                if time.monotonic() > deadline:
                    _fail(batch, err)
                    return
                log.warning("event writer: Redis unavailable (%s), retrying", reason(err))
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            _settle(batch, results)
            return

    def _execute(self, batch: list[_Item]) -> list[Any]:
        """Send the batch as one pipeline on a pooled connection and read every reply.

        Packed with hiredis and read raw: redis-py's ``Pipeline`` spends more per command
        (callbacks, hooks, bookkeeping) than the relay spends on a whole chunk.
        """
        commands = [command for item in batch for command in item[0]]
        pool = self._redis.connection_pool
        connection = pool.get_connection()
        try:
            packed = b"".join(map(hiredis.pack_command, commands))
            connection.send_packed_command([packed])  # type: ignore[no-untyped-call]
            replies = _read(connection, len(commands))
            # a script Redis lacked (restarted, flushed): nothing of it ran, and it is its
            # job's last write, so it runs now, sent whole, after the rest of the batch
            unloaded = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)
                        and commands[i][0] == "EVALSHA" and named(commands[i][1])]
            if unloaded:
                connection.send_packed_command([b"".join(hiredis.pack_command(
                    ("EVAL", script(str(named(commands[i][1]))), *commands[i][2:]))
                    for i in unloaded)])  # type: ignore[no-untyped-call]
                for i, reply in zip(unloaded, _read(connection, len(unloaded)), strict=True):
                    replies[i] = reply
            return replies
        except BaseException:
            connection.disconnect()  # type: ignore[no-untyped-call]  # replies may be unread
            raise
        finally:
            pool.release(connection)


def _read(connection: Any, count: int) -> list[Any]:
    """``count`` replies, an error reply as its exception."""
    replies: list[Any] = []
    for _ in range(count):
        try:
            replies.append(connection.read_response())
        except redis.ResponseError as err:
            replies.append(err)
    return replies


def _settle(batch: list[_Item],
            results: list[Any]) -> None:
    offset = 0
    for commands, future, _ in batch:
        mine = results[offset:offset + len(commands)]
        offset += len(commands)
        error = next((r for r in mine if isinstance(r, Exception)
                      and _DUPLICATE_ID not in str(r)), None)
        if error is not None:
            log.error("event writer: command failed: %s", error)
        if future is not None:
            if error is None:
                future.set_result(mine)
            else:
                future.set_exception(error)


def _fail(batch: list[_Item], err: Exception) -> None:
    log.error("event writer: giving up on %d items: %s", len(batch), err)
    for _, future, _ in batch:
        if future is not None:
            future.set_exception(err)


def _size(commands: Sequence[Command]) -> int:
    """Roughly the bytes ``commands`` hold (their string arguments)."""
    return sum(len(arg) for command in commands for arg in command
               if isinstance(arg, (str, bytes)))
