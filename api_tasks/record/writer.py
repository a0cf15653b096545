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

On a Redis Cluster each node gets its share of a flush on a connection of its own, from a
thread of its own (``_Flight``): a node that stops answering (a network dropping its packets)
holds only its own slots' writes for as long as its connection waits, and the writes of a
node out of reach wait apart, in order per slot, while the others go on.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, wait
from typing import Any, cast

import redis
import redis.cluster
from redis.exceptions import AskError, ClusterError, MovedError, RedisClusterException

from api_tasks.connections import UNAVAILABLE, is_cluster, reason
from api_tasks.record.exchange import ANY, Command, exchange, followed, pool_of, slot_of

__all__ = ["EventWriter"]

log = logging.getLogger(__name__)
_Item = tuple[Sequence[Command], "Future[list[Any]] | None", int]
_DUPLICATE_ID = "equal or smaller than the target stream top item"
_MAX_PENDING = 16 * 1024 * 1024  # bytes of commands queued or being written, per process
# seconds a flush waits for a cluster node's share before going on without it (a healthy
# node answers in milliseconds; one that stops answering holds only its own slots)
_STALL = 0.25


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
        self._done = False  # the thread has taken its last batch: what comes now is refused
        self._thread = threading.Thread(target=self._run, name="api-tasks-writer", daemon=True)
        # on a Redis Cluster: the client, the items held for a node out of reach, each node's
        # share in flight (by its pool), and whether one landed since the writer last looked
        self._cluster = cast("redis.cluster.RedisCluster", client) if is_cluster(client) \
            else None
        self._held = _Held()
        self._flights: dict[Any, _Flight] = {}
        self._landed = False
        self._lanes = _Lanes()
        self._learning: Future[Any] | None = None  # the slots being learnt anew

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def submit(self, commands: Sequence[Command], wait: bool = False,
               timeout: float | None = None, size: int | None = None) -> Future[list[Any]] | None:
        """Queue commands; with ``wait``, return a future done once they are in Redis (on a
        Redis Cluster, commands that keep to one slot).

        Blocks while the writer is more than ``max_pending_bytes`` behind (at most
        ``timeout`` seconds, then ``TimeoutError``; the writer gives up on a down Redis
        after ``retry_for``, so even without one the wait ends). ``size``: the bytes the
        commands hold, if the caller knows (else they are counted).
        """
        future: Future[list[Any]] | None = Future() if wait else None
        if size is None:
            size = _size(commands)
        slot = ANY
        if self._cluster is not None:  # a node's share carries items whole, in order
            slot = slot_of(self._cluster, commands[0])
            if any(slot_of(self._cluster, command) != slot for command in commands[1:]):
                raise ValueError("the commands handed over together must keep to one slot "
                                 "(a job's keys and its channel share one)")
        with self._lock:
            if self._behind(size, slot):
                self._wait_for_room(size, slot, timeout)
            if self._done:  # closed and flushed: nobody would write it
                log.error("event writer: closed, %d commands not written", len(commands))
                if future is not None:
                    future.set_exception(RuntimeError("the event writer is closed"))
                return future
            self._pending += size
            self._queue.append((commands, future, size))
            self._ready.notify()
        return future

    def _behind(self, size: int, slot: int) -> bool:
        """Whether ``size`` more bytes would put the writer too far behind: past
        ``max_pending_bytes`` queued, or, for a slot whose node is out of reach (a Redis
        Cluster's), past as much held for such nodes (the jobs writing to it wait, not the
        others, and nothing is dropped)."""
        if self._pending > 0 and self._pending + size > self._max_pending:
            return True
        return self._held.bounds(slot) and self._held.bytes + size > self._max_pending

    def _wait_for_room(self, size: int, slot: int, timeout: float | None) -> None:
        """With the lock held: wait until the writer has caught up enough."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._waiting += 1
        try:
            while self._behind(size, slot) and not self._closed:
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
        """What is queued (empty once closed, or when items held for a node are due)."""
        with self._ready:
            while not self._queue and not self._landed:
                if self._held:
                    if self._held.left() <= 0:
                        break  # held items are due: try them again
                    self._ready.wait(self._held.left())
                elif self._closed and not self._flights:
                    break
                else:
                    self._ready.wait()
            self._landed = False
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
            if not batch and not self._held and not self._flights:
                with self._lock:  # (a thread woken by close may have queued since)
                    if not self._queue and self._closed:
                        self._done = True
                        self._lanes.close()
                        return
                continue
            try:
                if self._cluster is None:
                    self._flush(batch)
                else:  # what it holds for a node out of reach is bounded apart
                    self._flush_cluster(self._cluster, batch)
            except Exception as err:  # the thread must outlive any one bad batch
                log.exception("event writer: batch failed")
                _fail(batch, err)
            finally:
                with self._lock:
                    self._pending -= sum(size for _, _, size in batch)
                    if self._waiting:
                        self._room.notify_all()

    def _flush(self, batch: list[_Item]) -> None:
        """Write the batch as one pipeline, trying again while Redis is out of reach (up to
        ``retry_for``)."""
        deadline = time.monotonic() + self._retry_for
        delay = 0.05
        pool = self._redis.connection_pool
        commands = [command for item in batch for command in item[0]]
        while True:
            results = exchange({pool: commands})[pool]
            down = next((r for r in results[:1] if isinstance(r, UNAVAILABLE)), None)
            if down is None:
                _settle(batch, results)
                return
            if time.monotonic() > deadline:
                _fail(batch, down)
                return
            log.warning("event writer: Redis unavailable (%s), retrying", reason(down))
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _flush_cluster(self, cluster: redis.cluster.RedisCluster, batch: list[_Item]) -> None:
        """Write the batch on a Redis Cluster, each node's share on a connection and a thread
        of its own (``_Flight``), waiting ``_STALL`` at most for them. The items of a node out
        of reach (or of a slot that moved) are held, with every later item of their slots (a
        job's writes stay in order), and tried again after a pause; those of a node still
        answering a share wait behind it; the others go on."""
        now = time.monotonic()
        released = self._held.release(now)
        again = {id(item) for _, item in released}  # (their bytes are counted as held still)
        failed = False
        try:
            work = [*released, *((slot_of(cluster, item[0][0]), item) for item in batch)]
            while True:  # (what waited behind a share that landed goes next)
                if work:
                    held, launched = self._route(cluster, work, again, now)
                    wait(launched, timeout=_STALL)  # (not for a share sent before, still out)
                    failed = failed or held
                work, landed_failed = self._land(now, again)
                failed = failed or landed_failed
                if not work:
                    break
            for items, err in self._held.expired(now, self._retry_for):
                _fail(items, err)
        except Exception as err:  # nothing taken out or held this round may stay untold
            self._held.discard([*batch, *(item for _, item in released)], again)
            _fail([item for _, item in released], err)
            raise
        finally:
            self._held.trying.clear()
        if released or failed:  # tried: the next try of what is held is a pause away
            self._held.pause(now)
            if self._held:
                log.warning("event writer: %d slots of the cluster out of reach (%s), "
                            "retrying", len(self._held.slots), reason(self._held.error))
                self._learn(cluster)

    def _route(self, cluster: redis.cluster.RedisCluster, work: list[tuple[int, _Item]],
               counted: set[int], now: float) -> tuple[bool, list[Future[Any]]]:
        """Send each node its share of ``work`` (slot, item), in order: an item of a held slot
        is held behind it, one of a slot whose node still answers a share waits behind that
        share. Whether a slot no node serves held some, and the shares sent."""
        failed = False
        shares: dict[Any, list[tuple[int, _Item]]] = {}
        aloft = self._held.aloft
        for slot, item in work:
            mine = id(item) in counted or id(item) in aloft  # its bytes counted as held
            if self._held.holds(slot):
                aloft.discard(id(item))
                self._held.hold(slot, item, now, None, mine)
                continue
            flying = self._held.flying.get(slot)  # (even if the slot moved meanwhile)
            try:
                pool = flying if flying is not None else pool_of(cluster, slot)
            except UNAVAILABLE as err:
                aloft.discard(id(item))
                self._held.hold(slot, item, now, err, mine)
                failed = True
                continue
            if not mine:  # in flight, its bytes count as held: the bound holds for them
                self._held.bytes += item[2]
            aloft.add(id(item))
            self._held.flying[slot] = pool
            flight = self._flights.get(pool)
            if flight is not None:
                flight.behind.append((slot, item))
            else:
                shares.setdefault(pool, []).append((slot, item))
        launched = []
        for pool, items in shares.items():
            try:
                future = self._lanes.run(_address(pool), _send_share, cluster, pool,
                                         [item[0] for _, item in items])
            except Exception as err:  # (a thread that could not start) they fail, freed
                log.exception("event writer: a node's share not sent")
                for slot, item in items:
                    self._held.flying.pop(slot, None)
                    self._held.aloft.discard(id(item))
                    self._held.settled(item, True)
                _fail([item for _, item in items], err)
                continue
            flight = _Flight(future, items)
            self._flights[pool] = flight
            flight.future.add_done_callback(self._on_landed)
            launched.append(flight.future)
        return failed, launched

    def _on_landed(self, _: Future[Any]) -> None:
        with self._lock:
            self._landed = True
            self._ready.notify()

    def _land(self, now: float, again: set[int]) -> tuple[list[tuple[int, _Item]], bool]:
        """Take in the shares that landed: settle their items or hold them; what waited
        behind them, to send next; and whether some were held (``again``: the ids of the
        items this flush took out of the held ones, forgotten as they land)."""
        nxt: list[tuple[int, _Item]] = []
        failed = False
        for pool, flight in list(self._flights.items()):
            if not flight.future.done():
                continue
            del self._flights[pool]
            for slot, _ in (*flight.items, *flight.behind):
                self._held.flying.pop(slot, None)
            done = 0  # of its items, settled or held
            try:
                for (slot, item), mine in zip(flight.items, flight.future.result(),
                                              strict=True):
                    self._held.aloft.discard(id(item))
                    again.discard(id(item))
                    if self._held.holds(slot):  # an earlier item of its slot waits: so does
                        self._held.hold(slot, item, now, None, True)  # it (written, if it
                        # went: sent again, a stream entry is refused and a script replays)
                    else:
                        error = next((r for r in mine if isinstance(r, _STILL_AGAIN)), None)
                        if error is None:
                            _settle([item], mine)
                            self._held.settled(item, True)
                        else:
                            self._held.hold(slot, item, now, error, True)
                            failed = True
                    done += 1
            except Exception as err:  # (a bug) the rest fail, their bytes freed
                log.exception("event writer: a node's share failed")
                rest = [item for _, item in flight.items[done:]]
                for item in rest:
                    self._held.aloft.discard(id(item))
                    again.discard(id(item))
                    self._held.settled(item, True)
                _fail(rest, err)
            nxt += flight.behind  # (held now, if their slot's items were)
        return nxt, failed

    def _learn(self, cluster: redis.cluster.RedisCluster) -> None:
        """Learn who serves the held slots now (a failover, a slot that moved), on a thread
        of its own: the first node it asks may be the one that stopped answering."""
        if self._learning is not None and not self._learning.done():
            return
        self._learning = self._lanes.run("learn", _initialize, cluster)


def _send_share(cluster: redis.cluster.RedisCluster, pool: Any,
                items: list[Sequence[Command]]) -> list[list[Any]]:
    """One node's share of a flush (on its lane): each item's replies, an ``ASK`` followed at
    once where nothing else in the item says to send it whole again (nothing ran)."""
    replies = exchange({pool: [command for commands in items for command in commands]})[pool]
    out = []
    offset = 0
    for commands in items:
        mine = replies[offset:offset + len(commands)]
        offset += len(commands)
        if not any(isinstance(r, _AGAIN) for r in mine):  # a slot moving in: follow it
            mine = [followed(cluster, command) if isinstance(reply, AskError) else reply
                    for command, reply in zip(commands, mine, strict=True)]
        out.append(mine)
    return out


def _address(pool: Any) -> tuple[Any, Any]:
    """A node's lane: by its address, which outlives the pool objects of a slots update."""
    return pool.connection_kwargs.get("host"), pool.connection_kwargs.get("port")


class _Lanes:
    """A daemon thread per cluster node (and one that learns the slots), each running what it
    is handed in turn: a node that stops answering holds up its own lane only, and never the
    process's exit."""

    def __init__(self) -> None:
        self._queues: dict[Any, queue.SimpleQueue[Any]] = {}

    def run(self, lane: Any, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """``fn(*args)`` on the lane's thread; its future."""
        future: Future[Any] = Future()
        work = self._queues.get(lane)
        if work is None:
            work = self._queues[lane] = queue.SimpleQueue()
            threading.Thread(target=_serve, args=(work,), name="api-tasks-writer-node",
                             daemon=True).start()
        work.put((future, fn, args))
        return future

    def close(self) -> None:
        """Let the lanes' threads end once they are done."""
        for work in self._queues.values():
            work.put(None)
        self._queues.clear()


def _serve(work: queue.SimpleQueue[Any]) -> None:
    while (task := work.get()) is not None:
        future, fn, args = task
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*args))
            except BaseException as err:  # handed to whoever waits on it
                future.set_exception(err)


def _initialize(cluster: redis.cluster.RedisCluster) -> None:
    try:
        cluster.nodes_manager.initialize()
    except (redis.RedisError, RedisClusterException) as err:
        log.debug("event writer: slots not learnt anew (%s)", err)


class _Flight:
    """One cluster node's share of a flush, sent and read on a thread of its own, and the
    items of its slots that came meanwhile, to send once it lands."""

    __slots__ = ("behind", "future", "items")

    def __init__(self, future: Future[list[list[Any]]],
                 items: list[tuple[int, _Item]]) -> None:
        self.future = future
        self.items = items
        self.behind: list[tuple[int, _Item]] = []


# replies that say: nothing ran, send it again once the slots are learnt anew (an ``ASK`` is
# followed at once)
_AGAIN: tuple[type[Exception], ...] = (*UNAVAILABLE, MovedError)
# an ASK followed in vain (redis-py gives up on a slot still moving with a ClusterError)
_STILL_AGAIN: tuple[type[Exception], ...] = (*_AGAIN, AskError, ClusterError,
                                             RedisClusterException)


class _Held:
    """Items waiting for a cluster node out of reach: per slot, in order, tried again
    together after a pause that doubles up to 2 s."""

    def __init__(self) -> None:
        self.slots: dict[int, deque[_Item]] = {}
        self.since: dict[int, float] = {}  # when each slot was first held (its deadline)
        self.errors: dict[int, Exception] = {}  # what each slot's node last answered
        self.trying: set[int] = set()  # slots whose held items are being tried again now
        self.flying: dict[int, Any] = {}  # slots with items in a node's share in flight: its pool
        self.aloft: set[int] = set()  # the items in flight or waiting behind (counted in bytes)
        self.bytes = 0  # of the items held, or taken out to be tried again
        self.due = 0.0
        self.delay = 0.0

    def __bool__(self) -> bool:
        return bool(self.slots)

    @property
    def error(self) -> Exception:
        """One held slot's error, to say why in a line."""
        return next(iter(self.errors.values()), redis.ConnectionError("a node is out of reach"))

    def holds(self, slot: int) -> bool:
        """Whether a slot's items wait (a later item of it must wait behind them)."""
        return slot in self.slots

    def bounds(self, slot: int) -> bool:
        """Whether a job writing to this slot is bound by the bytes held (read by the
        submitting threads, while the writer may be trying the slot again)."""
        return slot in self.slots or slot in self.trying or slot in self.flying

    def left(self) -> float:
        """Seconds until the held items are due."""
        return max(self.due - time.monotonic(), 0.0)

    def hold(self, slot: int, item: _Item, now: float, error: Exception | None,
             counted: bool = False) -> None:
        """Hold an item behind its slot's others (``error``: what its node answered;
        ``counted``: taken out by ``release``, its bytes still counted)."""
        self.slots.setdefault(slot, deque()).append(item)
        self.since.setdefault(slot, now)
        if not counted:
            self.bytes += item[2]
        if error is not None or slot not in self.errors:
            self.errors[slot] = error or redis.ConnectionError("a node is out of reach")

    def discard(self, items: list[_Item], counted: set[int]) -> None:
        """Forget these items (their senders were told they failed), held or not (``counted``:
        the ids of those ``release`` took out, whose bytes are counted either way)."""
        gone = {id(item): item for item in items if id(item) not in self.aloft}  # (in flight:
        # their bytes are freed as they land)
        for slot in list(self.slots):
            kept = deque(item for item in self.slots[slot] if id(item) not in gone)
            for item in self.slots[slot]:
                if id(item) in gone and id(item) not in counted:
                    self.bytes -= item[2]
            if kept:
                self.slots[slot] = kept
            else:
                del self.slots[slot]
        self.bytes -= sum(gone[key][2] for key in counted if key in gone)

    def drop(self, slot: int) -> list[_Item]:
        """A slot's items, taken out for good."""
        items = list(self.slots.pop(slot, ()))
        self.bytes -= sum(item[2] for item in items)
        self.since.pop(slot, None)
        self.errors.pop(slot, None)
        return items

    def release(self, now: float) -> list[tuple[int, _Item]]:
        """Every held item, in order, once they are due (else none), to be tried again: each
        is then ``settled`` or held again; a slot's deadline runs on until one of its writes
        lands."""
        if not self.slots or now < self.due:
            return []
        out = [(slot, item) for slot, items in self.slots.items() for item in items]
        self.trying = set(self.slots)
        self.slots.clear()
        return out

    def settled(self, item: _Item, counted: bool) -> None:
        """An item written (``counted``: one taken out by ``release``)."""
        if counted:
            self.bytes -= item[2]

    def expired(self, now: float, retry_for: float) -> list[tuple[list[_Item], Exception]]:
        """The items of slots held past ``retry_for``, taken out; a slot no longer held is
        forgotten."""
        gone = []
        for slot in list(self.since):
            if slot in self.flying:
                continue  # being tried again: its deadline runs on
            if slot not in self.slots:
                del self.since[slot]
                self.errors.pop(slot, None)
            elif now - self.since[slot] > retry_for:
                error = self.errors[slot]
                gone.append((self.drop(slot), error))
        return gone

    def pause(self, now: float) -> None:
        """After a try: the next a pause away (doubling while items stay held)."""
        self.delay = min(self.delay * 2 or 0.05, 2.0) if self.slots else 0.0
        self.due = now + self.delay


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
        if future is not None and not future.done():  # (failed once already: a lost batch)
            if error is None:
                future.set_result(mine)
            else:
                future.set_exception(error)


def _fail(batch: list[_Item], err: Exception) -> None:
    log.error("event writer: giving up on %d items: %s", len(batch), err)
    for _, future, _ in batch:
        if future is not None and not future.done():
            future.set_exception(err)


def _size(commands: Sequence[Command]) -> int:
    """Roughly the bytes ``commands`` hold (their string arguments)."""
    return sum(len(arg) for command in commands for arg in command
               if isinstance(arg, (str, bytes)))
