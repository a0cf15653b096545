"""kombu's Redis transport, hardened: a malformed or huge message cannot stop a worker.

Stock kombu decodes each popped message with no guard, so one garbage string
(or JSON that is not a message envelope) pushed onto a queue raises out of
the event loop and Celery exits with "Unrecoverable error". Here such a
message is logged and dropped (it was already popped), and the worker goes
on consuming. A message larger than ``max_message_bytes`` (a transport
option) is dropped the same way before it is decoded: a 50 MB message once
took a worker to 2.4 GB. Errors from Celery's own handling of a message never
reach this far: Celery catches them itself.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from queue import Empty
from typing import Any

import redis
from kombu.transport import redis as kombu_redis

__all__ = ["Transport"]

log = logging.getLogger(__name__)


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


class Channel(kombu_redis.Channel):
    """A channel whose BRPOP reader survives undecodable and oversized messages."""

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

    def _brpop_read(self, **options: Any) -> Any:
        try:
            return super()._brpop_read(**options)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            log.error("dropped a queue message that is not JSON: %s", err)
            raise Empty() from None


class Transport(kombu_redis.Transport):
    """The Redis transport with the hardened channel."""

    Channel = Channel

    def _deliver(self, message: Any, queue: str) -> None:
        try:
            super()._deliver(message, queue)
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            log.error("dropped a queue message that is not a message envelope (%s: %s)",
                      type(err).__name__, err)
