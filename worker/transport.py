"""kombu's Redis transport, hardened: a malformed or huge message cannot stop a worker.

Stock kombu decodes each popped message with no guard, so one garbage string
(or JSON that is not a message envelope) pushed onto a queue raises out of
the event loop and Celery exits with "Unrecoverable error". Here such a
message is logged and dropped (it was already popped), and the worker goes
on consuming. A message larger than ``max_message_bytes`` (a transport
option) is dropped the same way before it is decoded: a 50 MB message once
took a worker to 2.4 GB. Errors from Celery's own handling of a message never
reach this far: Celery catches them itself.

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
from typing import Any

import redis
import redis.sentinel
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual as kombu_virtual
from kombu.utils import json as kombu_json

from api_tasks.record.acks import EARLY_ACKS

__all__ = ["SentinelTransport", "Transport"]

log = logging.getLogger(__name__)

# Messages this process popped but could not record as unacked: Redis went away between
# kombu's BRPOP and its write to the unacked hash (a failover, a restart). Nowhere else
# holds them, so they go back on their queue once Redis answers again.
_unrecorded: deque[tuple[str, Any]] = deque()


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
    """kombu's unacked bookkeeping, but for the entries a job's finish took out itself."""

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
        super()._brpop_start(timeout)

    def _put_back(self) -> None:
        """Push the messages popped as Redis went away back to the head of their queue."""
        count = len(_unrecorded)
        try:
            with self.conn_or_acquire() as client:
                while _unrecorded:
                    queue, message = _unrecorded[0]
                    try:  # as kombu's own restore writes it (its JSON, its priority queue)
                        payload = kombu_json.dumps(message)
                        key = self._q_for_pri(queue, self._get_message_priority(message))
                    except (TypeError, ValueError, KeyError) as err:
                        log.error("dropped a popped message that cannot be put back: %s", err)
                    else:
                        client.rpush(key, payload)  # BRPOP takes from the right: next out
                    _unrecorded.popleft()
        except (redis.ConnectionError, redis.TimeoutError) as err:
            log.warning("could not yet put back %d message(s) popped as Redis went away: %s",
                        len(_unrecorded), err)
            return
        log.warning("put back %d message(s) popped as Redis went away", count)

    def _brpop_read(self, **options: Any) -> Any:
        try:
            return super()._brpop_read(**options)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            log.error("dropped a queue message that is not JSON: %s", err)
            raise Empty() from None


class _SafeDelivery:
    """Drops a message that is not a message envelope instead of stopping the worker, and
    keeps one whose delivery Redis cut off, to put it back."""

    def _deliver(self, message: Any, queue: str) -> None:
        try:
            super()._deliver(message, queue)  # type: ignore[misc]
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            log.error("dropped a queue message that is not a message envelope (%s: %s)",
                      type(err).__name__, err)
        except (redis.ConnectionError, redis.TimeoutError) as err:
            # put back even if its entry was written after all: the claim drops a duplicate
            _unrecorded.append((queue, message))
            log.warning("Redis went away as a message was delivered (%s): it goes back on "
                        "its queue when Redis answers again", err)
            raise


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
