"""Kombu's unacked entries that a job's finish took out itself.

With the broker and the state on one Redis, a job's finish script (``finish.lua``) takes the
message's unacked entry out once the finish ran, as kombu's ack would, so the transport's ack,
which would do it again in a MULTI/EXEC round trip of its own, only forgets the delivery in
memory (``EARLY_ACKS``; ``worker/transport.py``). A finish that did not run leaves the entry,
so a requeue finds it.
"""

from __future__ import annotations

import threading

__all__ = ["EARLY_ACKS", "EarlyAcks"]


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
