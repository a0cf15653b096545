"""kombu's Redis transport, hardened: a malformed or huge message cannot stop a worker.

Stock kombu decodes each popped message with no guard, so one garbage string
(or JSON that is not a message envelope) pushed onto a queue raises out of
the event loop and Celery exits with "Unrecoverable error". Here such a
message is logged and dropped (it was already popped), and the worker goes
on consuming. A message larger than ``max_message_bytes`` (a transport
option) is dropped the same way before it is decoded: a 50 MB message once
took a worker to 2.4 GB. Errors from Celery's own handling of a message never
reach this far: Celery catches them itself.

kombu pops a message (``BRPOP``) and then writes its unacked entry, a round trip each. Here
the write is a script (``unacked_take``) that also takes the next messages, as many as the
prefetch has room for, off the queues and records them in the same step; while the queues
had more, the next fetch is that script again rather than a ``BRPOP``. A backlog then costs
one round trip for many messages, and none of them is off the queue without its entry (a
take whose reply is lost leaves them recorded: the reaper gives them back, as a dead
worker's).
Redis going away between kombu's ``BRPOP`` and its write of the unacked entry would lose
the popped message; here it is kept and pushed back once Redis answers. An ack whose unacked
entry the job's finish already took out (``api_tasks.record.acks``) makes no round trip.
``SentinelTransport`` is the same on the primary Redis Sentinel names.
"""

from __future__ import annotations

import functools
import json
import logging
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from queue import Empty
from time import monotonic, time
from typing import Any

import redis
import redis.sentinel
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual as kombu_virtual
from kombu.utils import json as kombu_json
from kombu.utils.encoding import bytes_to_str

from api_tasks.record.acks import EARLY_ACKS
from api_tasks.record.scripts import script, sha

__all__ = ["SentinelTransport", "Transport"]

log = logging.getLogger(__name__)

# Messages this process popped but could not record as unacked: Redis went away between
# kombu's BRPOP and its write to the unacked hash (a failover, a restart). Nowhere else
# holds them, so they go back on their queue once Redis answers again.
_unrecorded: deque[tuple[str, Any]] = deque()
# the most messages one take records and hands out at once: larger takes filled a gevent
# worker's prefetch before its fast jobs ended, and Celery's loop for green pools then waits
# out its 2 s poll rather than waking on an ack (bench.run --quick, 500 jobs, prefetch 200:
# 8 at once 2.8x the bare task's throughput, 32 0.5x; with a prefetch of 1000, 32 gave 1.7x)
_TAKE_AT_ONCE = 8


class _SizeLimit:
    """Drops a popped message over ``max_message_bytes`` before anyone decodes it."""

    max_message_bytes = 0

    def __init__(self, *args: Any, max_message_bytes: int = 0, **kwargs: Any) -> None:
        self.max_message_bytes = max_message_bytes
        super().__init__(*args, **kwargs)

    def parse_response(self, connection: Any, command_name: Any, **options: Any) -> Any:
        response = super().parse_response(connection, command_name,  # type: ignore[misc]
                                          **options)
        limit = self.max_message_bytes
        if limit and command_name == "BRPOP" and response and len(response[1]) > limit:
            log.error("dropped a queue message of %d bytes, over the %d-byte limit "
                      "(jobs.max_request_bytes)", len(response[1]), limit)
            return None  # kombu reads it as an empty pop
        return response


class _SizedRedis(_SizeLimit, redis.Redis):
    pass


class _SizedPrefixedRedis(_SizeLimit, kombu_redis.PrefixedStrictRedis):
    pass


class QoS(kombu_redis.QoS):
    """kombu's unacked bookkeeping, but for the entries a take wrote or a job's finish took
    out itself."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.taken: set[str] = set()  # delivery tags whose unacked entry a take wrote

    def append(self, message: Any, delivery_tag: Any) -> None:
        if delivery_tag in self.taken:
            self.taken.discard(delivery_tag)
            kombu_virtual.QoS.append(self, message, delivery_tag)  # its entry is written
        else:
            super().append(message, delivery_tag)

    def room(self) -> int:
        """How many more messages the prefetch limit lets this channel hold now."""
        estimate = self.can_consume_max_estimate()  # None: no limit
        return _TAKE_AT_ONCE if estimate is None else min(estimate, _TAKE_AT_ONCE)

    def ack(self, delivery_tag: Any) -> None:
        if EARLY_ACKS.take(delivery_tag):
            kombu_virtual.QoS.ack(self, delivery_tag)  # only forgotten here: gone from Redis
        else:
            super().ack(delivery_tag)

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        EARLY_ACKS.take(delivery_tag)  # (its finish ran: nothing is left to put back)
        super().reject(delivery_tag, requeue)


class Channel(kombu_redis.Channel):
    """A channel whose BRPOP reader survives undecodable and oversized messages."""

    QoS = QoS

    from_transport_options = (  # type: ignore[assignment]
        *kombu_redis.Channel.from_transport_options, "max_message_bytes")
    max_message_bytes = 0
    _pooled: Any = None
    _taking = 0  # how many the take on the polling connection asked for (0: a BRPOP, or none)
    _more = False  # the last take found as many as it asked for: take again before blocking
    _no_ack: frozenset[str] = frozenset()  # queues consumed without acks: never recorded

    def basic_consume(self, queue: str, *args: Any, **kwargs: Any) -> Any:
        # (Celery's own replies, say: an entry would never be taken out)
        if kwargs.get("no_ack", args[0] if args else False):
            self._no_ack |= {queue}
        return super().basic_consume(queue, *args, **kwargs)

    def basic_cancel(self, consumer_tag: Any) -> Any:
        self._no_ack -= {self._tag_to_queue.get(consumer_tag)}
        return super().basic_cancel(consumer_tag)

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        # kombu builds a new client object (a copy of every response callback) for each
        # ack and each delivery's unacked entry: a tenth of a worker's CPU per job.
        # A client is thread-safe and holds no connection, so one per pool serves all.
        if client:
            yield client
            return
        if self.connection is None or self.connection.client is None:
            # Celery closes a broken connection's transport before its channel, whose
            # close then gives back the unacked messages; and a job that ends after the
            # channel closed acks on it: kombu would rebuild the pool from the missing
            # connection info, or fail on the channel's cleared connection, and stop the
            # worker ("Unrecoverable error"). As a connection error it is logged and passed
            # over, and Redis keeps those messages for the reaper anyway.
            raise redis.ConnectionError("the broker connection is closed")
        pooled, pool = self._pooled, self.pool
        if pooled is None or pooled.connection_pool is not pool:
            pooled = self._pooled = self._create_client()
        yield pooled

    def _get_client(self) -> Any:
        client = super()._get_client()
        if isinstance(client, functools.partial):  # kombu's prefixed client, with its prefix
            return functools.partial(_SizedPrefixedRedis, *client.args,
                                     max_message_bytes=self.max_message_bytes, **client.keywords)
        return functools.partial(_SizedRedis, max_message_bytes=self.max_message_bytes)

    def _brpop_start(self, timeout: Any = None) -> None:
        if _unrecorded:
            self._put_back()
        if not self._more or self._no_ack or not (keys := self._queue_keys()):
            super()._brpop_start(timeout)
            return
        self._taking = self.qos.room()
        connection = self.client.connection
        self._in_poll = connection  # as kombu's BRPOP: the poller waits for its reply
        self._brpop_sent_at = monotonic()  # type: ignore[assignment]
        connection.send_command(*self._take_command(keys, self._taking))

    def _queue_keys(self) -> list[str]:
        """The queues' lists in the order BRPOP looks at them (priority first), prefixed."""
        queues = self._queue_cycle.consume(len(self.active_queues))
        return [self.global_keyprefix + self._q_for_pri(queue, pri)
                for pri in self.priority_steps for queue in queues]

    def _take_command(self, keys: list[str], want: int, *popped: str) -> list[Any]:
        """``unacked_take`` over ``keys`` for ``want`` messages, recording ``popped`` (a
        popped message's tag and entry) first."""
        prefix = self.global_keyprefix
        return ["EVALSHA", sha("unacked_take"), 2 + len(keys), prefix + self.unacked_index_key,
                prefix + self.unacked_key, *keys, repr(time()), want, self.max_message_bytes,
                *popped]

    def _put_back(self) -> None:
        """Push the messages popped as Redis went away back to the head of their queue."""
        count = len(_unrecorded)
        try:
            with self.conn_or_acquire() as client:
                while _unrecorded:  # the last popped first: the first ends up next out
                    queue, message = _unrecorded[-1]
                    try:  # as kombu's own restore writes it (its JSON, its priority queue)
                        payload = kombu_json.dumps(message)
                        key = self._q_for_pri(queue, self._get_message_priority(message))
                    except (TypeError, ValueError, KeyError) as err:
                        log.error("dropped a popped message that cannot be put back: %s", err)
                    else:
                        client.rpush(key, payload)  # BRPOP takes from the right: next out
                    _unrecorded.pop()
        except redis.RedisError as err:  # (one out of memory too: tried again next time)
            log.warning("could not yet put back %d message(s) popped as Redis went away: %s",
                        len(_unrecorded), err)
            return
        log.warning("put back %d message(s) popped as Redis went away", count)

    def _brpop_read(self, **options: Any) -> Any:
        try:
            if self._taking:
                return self._took(**options)
            return self._popped(**options)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            log.error("dropped a queue message that is not JSON: %s", err)
            raise Empty() from None

    def _reply(self, command: str, **options: Any) -> Any:
        """The reply on the polling connection (dropped on a connection error, as kombu does)."""
        connection = self.client.connection
        try:
            try:
                return self.client.parse_response(connection, command, **options)
            except self.connection_errors:
                connection.disconnect()  # the next cycle connects again
                raise
        finally:
            self._in_poll = None  # type: ignore[assignment]
            self._flush_brpop_reauth()

    def _popped(self, **options: Any) -> bool:
        """A BRPOP's message: recorded by a take that also takes what came behind it."""
        self._more = False
        popped = self._reply("BRPOP", **options)
        if not popped:
            raise Empty()
        dest = bytes_to_str(popped[0]).rsplit(self.sep, 1)[0]
        self._queue_cycle.rotate(dest)
        message = kombu_json.loads(bytes_to_str(popped[1]))
        try:
            properties = message["properties"]
            tag, info = str(properties["delivery_tag"]), properties["delivery_info"]
            entry = kombu_json.dumps([message, info["exchange"], info["routing_key"]])
        except (KeyError, TypeError):  # not an envelope: kombu's delivery drops it
            tag = ""
        if not tag or dest in self._no_ack:  # kombu's own way (no entry for a no-ack queue)
            self.connection._deliver(message, dest)
            return True
        want = 0 if self._no_ack else self.qos.room() - 1
        try:
            taken = self._take_now(self._take_command(self._queue_keys(), want, tag, entry))
        except (redis.ConnectionError, redis.TimeoutError) as err:
            # put back even if its entry was written after all: the claim drops a duplicate
            _unrecorded.append((dest, message))
            log.warning("Redis went away as a message was delivered (%s): it goes back on "
                        "its queue when Redis answers again", err)
            raise
        except redis.ResponseError:  # (out of memory, say) as kombu would: its own append
            self.connection._deliver(message, dest)
            return True
        self._hand_out([(dest, message, tag)], taken, want)
        return True

    def _take_now(self, command: list[Any]) -> Any:
        """Run a take on a pooled connection (loading the script into a Redis that lacks it)."""
        with self.conn_or_acquire() as client:
            try:  # (redis.Redis's own: a prefixed client would prefix only the first key)
                return redis.Redis.execute_command(client, *command)
            except redis.exceptions.NoScriptError:
                self._load_take()
                return redis.Redis.execute_command(client, *command)

    def _load_take(self) -> None:
        """Load ``unacked_take`` into a Redis that lacks it (restarted, or flushed)."""
        with self.conn_or_acquire() as client:
            client.script_load(script("unacked_take"))

    def _took(self, **options: Any) -> bool:
        """A take's messages, sent on the polling connection while the queues had more."""
        want, self._taking, self._more = self._taking, 0, False
        try:
            taken = self._reply("EVALSHA", **options)
        except redis.ResponseError as err:
            if isinstance(err, redis.exceptions.NoScriptError):
                self._load_take()
            else:  # a Redis out of memory, say: nothing taken; BRPOP waits meanwhile
                log.warning("Redis refused to take messages off the queues: %s", err)
            raise Empty() from None
        if not taken:
            raise Empty()
        self._hand_out([], taken, want)
        return True

    def _hand_out(self, first: list[tuple[str, Any, str]], taken: Any, want: int) -> None:
        """Deliver ``first`` and a take's messages (each with its queue and delivery tag), all
        recorded; one that fails to decode or is dropped as no envelope has its entry taken
        out, and those a failure leaves undelivered keep theirs for the reaper."""
        messages, dropped = deque(first), list[str]()
        if taken:
            key, found = taken
            dest = bytes_to_str(key)[len(self.global_keyprefix):].rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            self._more = len(found) // 3 >= want
            for i in range(0, len(found), 3):
                item, tag, size = bytes_to_str(found[i]), bytes_to_str(found[i + 1]), found[i + 2]
                if not item:
                    log.error("dropped a queue message of %d bytes, over the %d-byte limit "
                              "(jobs.max_request_bytes)", size, self.max_message_bytes)
                    continue
                try:
                    message = kombu_json.loads(item)
                except Exception as err:  # kombu's decoder raises more than JSON's errors
                    log.error("dropped a queue message that cannot be decoded: %s", err)
                    dropped.append(tag)
                    continue
                messages.append((dest, message, tag))
        self.qos.taken.update(tag for _, _, tag in messages)
        try:
            while messages:
                dest, message, tag = messages[0]
                if not self.connection._deliver(message, dest) and tag in self.qos.taken:
                    dropped.append(tag)  # never appended: its entry would bring it back
                messages.popleft()
        finally:
            self.qos.taken.difference_update([*dropped, *(tag for _, _, tag in messages)])
            if dropped:
                self._forget(dropped)

    def _forget(self, tags: list[str]) -> None:
        """Take out the unacked entries of messages that were dropped."""
        try:
            with self.qos.pipe_or_acquire() as pipe:
                for tag in tags:
                    self.qos._remove_from_indices(tag, pipe)
                pipe.execute()
        except redis.RedisError as err:  # they come back, and are dropped again
            log.warning("could not take out the entries of %d dropped message(s): %s",
                        len(tags), err)


class _SafeDelivery:
    """Drops a message that is not a message envelope instead of stopping the worker, and
    keeps one whose delivery Redis cut off, to put it back."""

    def _deliver(self, message: Any, queue: str) -> bool:
        """Whether the message was handed on (False: dropped)."""
        try:
            super()._deliver(message, queue)  # type: ignore[misc]
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            log.error("dropped a queue message that is not a message envelope (%s: %s)",
                      type(err).__name__, err)
            return False
        except (redis.ConnectionError, redis.TimeoutError) as err:
            # put back even if its entry was written after all: the claim drops a duplicate
            _unrecorded.append((queue, message))
            log.warning("Redis went away as a message was delivered (%s): it goes back on "
                        "its queue when Redis answers again", err)
            raise
        return True


class Transport(_SafeDelivery, kombu_redis.Transport):
    """The Redis transport with the hardened channel."""

    Channel = Channel


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """The hardened channel on the primary Sentinel names (found again on each reconnect)."""

    from_transport_options = (  # type: ignore[assignment]
        *Channel.from_transport_options,
        *(option for option in kombu_redis.SentinelChannel.from_transport_options
          if option not in Channel.from_transport_options), "sentinels")
    sentinels: list[tuple[str, int]] = []
    master_name: str = ""
    sentinel_kwargs: dict[str, Any] | None = None
    min_other_sentinels = 0

    def _sentinel_managed_pool(self, asynchronous: bool = False) -> Any:
        # kombu reads the Sentinels from the broker URL's failover list, and failing over
        # re-reads the transport from the next URL's scheme (kombu's own, not this one):
        # so the URL names one Sentinel and all of them come as a transport option
        params = self._connparams(asynchronous)
        nodes = self.sentinels or [(params["host"], params["port"])]
        params = {k: v for k, v in params.items() if k not in ("host", "port")}
        manager = redis.sentinel.Sentinel(nodes, min_other_sentinels=self.min_other_sentinels,
                                          sentinel_kwargs=self.sentinel_kwargs, **params)
        if asynchronous:  # kept so that kombu closes its connections to the Sentinels
            self._async_sentinel_manager = manager
        else:
            self._sentinel_manager = manager
        return manager.master_for(self.master_name, redis.Redis).connection_pool


class SentinelTransport(_SafeDelivery, kombu_redis.SentinelTransport):
    """kombu's Sentinel transport with the hardened channel."""

    Channel = SentinelChannel
