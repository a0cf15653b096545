"""kombu's Redis transport, hardened: a malformed message cannot stop a worker.

Stock kombu decodes each popped message with no guard, so one garbage string
(or JSON that is not a message envelope) pushed onto a queue raises out of
the event loop and Celery exits with "Unrecoverable error". Here such a
message is logged and dropped (it was already popped), and the worker goes
on consuming. Errors from Celery's own handling of a message never reach
this far: Celery catches them itself.
"""

from __future__ import annotations

import json
import logging
from queue import Empty
from typing import Any

from kombu.transport import redis as kombu_redis

__all__ = ["Transport"]

log = logging.getLogger(__name__)


class Channel(kombu_redis.Channel):
    """A channel whose BRPOP reader survives undecodable messages."""

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
