"""Kombu's unacked entries that a job's finish took out in its own round trip.

With the broker and the state on one Redis, a job's finish is followed, in the same item of
the event writer (one round trip), by ``unacked_drop``: it takes the message's unacked entry
out once the finish ran, as kombu's ack would, so the transport's ack, which would do it again
in a MULTI/EXEC round trip of its own, only forgets the delivery in memory (``EARLY_ACKS``;
``worker/transport.py``). A finish that failed leaves the entry, so a requeue finds it.
"""

from __future__ import annotations

import threading

from api_tasks.record.exchange import Command
from api_tasks.record.keys import Keys
from api_tasks.record.scripts import sha

__all__ = ["EARLY_ACKS", "EarlyAcks", "unacked_removal"]


def unacked_removal(keys: Keys, job_id: str, token: str, delivery_tag: str) -> Command:
    """The command that takes a delivery's unacked entry out after its job's finish ran (by
    its SHA1: the writer sends it whole to a Redis that lacks it); 1 if it did."""
    return ("EVALSHA", sha("unacked_drop"), 3, keys.job(job_id), keys.unacked_index(),
            keys.unacked(), token, delivery_tag)


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
