"""Kombu's unacked entries that a job's finish took out in its own round trip.

With the broker and the state on one Redis, a job's finish also removes its message's
unacked entry (``unacked_removal``, pipelined with the finish), so the transport's ack, which
would remove it again in a MULTI/EXEC round trip of its own, only forgets the delivery in
memory (``EARLY_ACKS``; ``worker/transport.py``). The entry goes only with a finish that ran:
the two are one item of the event writer, sent in order.
"""

from __future__ import annotations

import threading

from api_tasks.record.exchange import Command
from api_tasks.record.keys import Keys

__all__ = ["EARLY_ACKS", "EarlyAcks", "unacked_removal"]


def unacked_removal(keys: Keys, delivery_tag: str) -> list[Command]:
    """The commands of kombu's ack for one delivery (its unacked entry and index)."""
    return [("ZREM", keys.unacked_index(), delivery_tag),
            ("HDEL", keys.unacked(), delivery_tag)]


class EarlyAcks:
    """Delivery tags whose unacked entry a finish removed, until the transport acks them."""

    def __init__(self) -> None:
        self._tags: set[str] = set()
        self._lock = threading.Lock()

    def removed(self, delivery_tag: str) -> None:
        """A finish removed this delivery's unacked entry."""
        with self._lock:
            self._tags.add(delivery_tag)

    def take(self, delivery_tag: str) -> bool:
        """Whether a finish removed it (forgotten here from now on)."""
        with self._lock:
            if delivery_tag in self._tags:
                self._tags.discard(delivery_tag)
                return True
            return False


EARLY_ACKS = EarlyAcks()  # one per worker process: its transport and its runner share it
