"""Webhook events as Redis work: what queues one with the change it reports, and how its
deliveries read back.

``event_args`` builds the KEYS and ARGV of ``add_webhooks`` (the Lua prelude), which a script
that ends a batch or a job runs with its own change, so each delivery is queued exactly when
what it reports happens, and sent at least once (``execution/webhooks.py`` sends them). The
deliveries live in their subject's shard; what lives elsewhere (the owner's index of
deliveries, the sender's wake list) is written by the calls that follow the script.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from enum import StrEnum
from typing import TYPE_CHECKING, Any, NamedTuple

from api_tasks.connections import text_map
from api_tasks.record.calls import Call, command, lua
from api_tasks.record.keys import Keys

if TYPE_CHECKING:
    from config.settings import Settings

__all__ = ["NO_WEBHOOKS", "DeliveryStatus", "WebhookRecords", "Webhooks", "delivery_object",
           "event_args", "job_event_id", "job_notifier"]



class Webhooks(NamedTuple):
    """What queues an event's deliveries: ``add_webhooks``' KEYS and ARGV, for the script
    that makes the change, then the calls to run after it."""

    keys: list[str]
    args: list[Any]
    after: list[Call[Any]]


NO_WEBHOOKS = Webhooks([], [], [])


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
    # the owner's index and the wake list live on other slots than the subject's on a
    # Redis Cluster: written just after (an index entry whose delivery is not there is
    # skipped by a listing; a lost wake-up delays the sending to the sender's next look)
    after: list[Call[Any]] = [lua("owner_index", [keys.owned_webhooks(owner)], [i, ttl])
                              for i in ids]
    after.append(lua("wake", [keys.webhooks_wake()], [ttl]))
    return Webhooks([keys.webhooks(keys.shard(subject_id)), *(keys.webhook(i) for i in ids)],
                    [payload, owner, int(now * 1000), ttl,
                     *(item for pair in zip(ids, endpoints, strict=True) for item in pair)],
                    after)


def job_event_id(job_id: str) -> str:
    """The id of the webhook event that tells a job's end (one per job): without dashes, but
    for a batch line's (``<batch id>-<n>``), whose dash says which shard it is in."""
    return f"evt_{job_id if job_id.startswith('batch_') else job_id.replace('-', '')}"


def job_notifier(keys: Keys, settings: Settings) -> Callable[[str, str, str], Webhooks]:
    """What queues a job's event for these settings (``JobRecords``' notifier)."""
    def notify(owner: str, event: str, job_id: str) -> Webhooks:
        return event_args(keys, settings, owner, event, job_id, job_event_id(job_id))
    return notify


class DeliveryStatus(StrEnum):
    """Where a delivery is (the Lua scripts write these values)."""

    PENDING = "pending"  # not tried yet
    RETRYING = "retrying"  # tried, failed, due again at next_at
    DELIVERED = "delivered"  # a 2xx answered
    FAILED = "failed"  # given up after webhooks.retry_for


class WebhookRecords:
    """The calls that read an owner's webhook deliveries (each run on a sync or async shell)."""

    def __init__(self, keys: Keys) -> None:
        self.keys = keys

    def state(self, delivery_id: str) -> Call[dict[str, str]]:
        """A delivery's hash (empty if it expired)."""
        return command("HGETALL", self.keys.webhook(delivery_id), parse=text_map)


def delivery_object(delivery_id: str, state: dict[str, str], settings: Settings
                    ) -> dict[str, Any]:
    """A delivery as the gateway shows it: its event, endpoint, status and last attempt."""
    event = json.loads(state.get("payload") or "{}")
    endpoint = settings.webhook(state.get("owner", ""), int(state.get("endpoint") or -1))

    def seconds(name: str) -> float | None:
        return int(state[name]) / 1000 if state.get(name) else None
    return {"id": delivery_id, "object": "webhook.delivery", "event_id": event.get("id"),
            "event_type": event.get("type"), "subject_id": (event.get("data") or {}).get("id"),
            "url": endpoint.url if endpoint is not None else None,
            "status": DeliveryStatus(state.get("status") or DeliveryStatus.PENDING),
            "attempts": int(state.get("attempts") or 0), "created_at": seconds("first_at"),
            "last_attempt_at": seconds("last_at"),
            "last_status": int(state.get("last_status") or 0) or None,  # 0: no answer
            "last_error": state.get("last_error") or None,
            "next_attempt_at": seconds("next_at")
            if state.get("status") == DeliveryStatus.RETRYING else None,
            "delivered_at": seconds("delivered_at")}
