"""Webhook events as Redis work: what queues one with the change it reports.

``event_args`` builds the KEYS and ARGV of ``add_webhooks`` (the Lua prelude), which a script
that ends a batch or a job runs with its own change, so each delivery is queued exactly when
what it reports happens, and sent at least once (``execution/webhooks.py`` sends them).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from api_tasks.record.keys import Keys

if TYPE_CHECKING:
    from config.settings import Settings

__all__ = ["NO_WEBHOOKS", "Webhooks", "event_args", "job_event_id", "job_notifier"]

Webhooks = tuple[list[str], list[Any]]  # add_webhooks' KEYS and ARGV
NO_WEBHOOKS: Webhooks = ([], [])


def event_args(keys: Keys, settings: Settings, owner: str, event: str, subject_id: str,
               event_id: str) -> Webhooks:
    """The KEYS and ARGV that queue ``event`` about ``subject_id`` (a batch or a job) to
    gateway key ``owner``'s endpoints that take it; empty when none do."""
    endpoints = settings.webhooks_for(owner, event)
    if not endpoints:
        return NO_WEBHOOKS
    now = time.time()
    payload = json.dumps({"id": event_id, "object": "event", "created_at": int(now),
                          "type": event, "data": {"id": subject_id}}, separators=(",", ":"))
    ids = [f"{event_id}-{index}" for index in endpoints]
    ttl = settings.webhooks.retry_for + 86400  # a day to look at how the last try went
    return ([keys.webhooks(), *(keys.webhook(i) for i in ids)],
            [payload, owner, int(now * 1000), ttl,
             *(item for pair in zip(ids, endpoints, strict=True) for item in pair)])


def job_event_id(job_id: str) -> str:
    """The id of the webhook event that tells a job's end (one per job)."""
    return f"evt_{job_id.replace('-', '')}"


def job_notifier(keys: Keys, settings: Settings) -> Callable[[str, str, str], Webhooks]:
    """What queues a job's event for these settings (``JobRecords``' notifier)."""
    def notify(owner: str, event: str, job_id: str) -> Webhooks:
        return event_args(keys, settings, owner, event, job_id, job_event_id(job_id))
    return notify
