"""Webhook deliveries: every worker sends those due, signed as Standard Webhooks and OpenAI do.

A delivery is queued in Redis by the script that changes what it reports (``add_webhooks`` in
the Lua prelude), so it is sent at least once; receivers dedupe on ``webhook-id``. A worker
takes due deliveries one at a time, each put off by a lease of its own while it is sent,
and POSTs each to its endpoint: connecting only to public addresses or ``webhooks.private_hosts``,
following no redirect. A 2xx ends it; anything else is tried again after a delay that
doubles up to ``webhooks.max_delay``, for ``webhooks.retry_for``. Every attempt's status and
error stay in the delivery's hash. Nothing here blocks a job or a batch.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import redis
import requests

from api_tasks import metrics
from api_tasks.background import Sweep, each
from api_tasks.connections import text, text_map
from api_tasks.record.keys import Keys
from api_tasks.record.scripts import script
from api_tasks.upstream.job_urls import AddressGuard
from api_tasks.upstream.redact import scrub

if TYPE_CHECKING:
    from api_tasks.upstream.http_client import HttpClient
    from config.settings import Settings

__all__ = ["WebhookSender", "retry_delay", "sign"]

log = logging.getLogger(__name__)

_EVERY = 0.5  # seconds to the next look after one that sent some
_HELPER = 5.0  # between two looks of a worker that does not sweep: it joins in once it finds some
_TAKE = 20  # deliveries one look takes at most


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,`` and the base64 HMAC-SHA256 of
    ``id.timestamp.body``, keyed by the secret (base64 after ``whsec_``, else as it is)."""
    key = base64.b64decode(secret.removeprefix("whsec_")) if secret.startswith("whsec_") \
        else secret.encode()
    signed = hmac.new(key, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(signed.digest()).decode()


def retry_delay(attempts: int, initial: float, cap: float, draw: float) -> float:
    """Seconds before attempt ``attempts + 1``: doubling from ``initial`` up to ``cap``, with a
    tenth of jitter either way (``draw`` in [0, 1))."""
    return float(min(cap, initial * 2 ** max(attempts - 1, 0)) * (0.9 + 0.2 * draw))


class WebhookSender(Sweep):
    """A thread that sends the webhook deliveries when they are due."""

    def __init__(self, client: redis.Redis, keys: Keys, settings: Settings,
                 http: HttpClient, sweeping: Callable[[], bool] = lambda: True) -> None:
        super().__init__("api-tasks-webhooks", client, keys.webhooks_wake(),
                         settings.webhooks.retry_for + 86400, sweeping, _HELPER, log)
        self._redis = client
        self._keys = keys
        self._settings = settings
        self._http = http
        self._guard = AddressGuard(tuple(settings.webhooks.private_hosts))
        self._take = client.register_script(script("webhook_take"))
        self._done = client.register_script(script("webhook_done"))

    def sweep(self) -> float | None:
        """Send what is due; look again soon if some was (every worker then sends, each
        delivery under its own lease), else when the next is due."""
        tried, upcoming = self.run_once()
        return _EVERY if tried else upcoming

    def run_once(self) -> tuple[int, float | None]:
        """Send the deliveries due now, shard by shard, one taken at a time (each under its
        own lease): how many were tried, and in how many seconds the next is due (None: none
        pending)."""
        tried = 0

        def visit(shard: int) -> float | None:
            nonlocal tried
            sent, soonest = self._send_due(shard, _TAKE - tried)
            tried += sent
            return soonest

        found, failed = each(self.shards(self._keys.every_shard), visit)
        if failed is not None:  # the other shards' deliveries went
            raise failed
        return tried, min((soonest for soonest in found if soonest is not None), default=None)

    def _send_due(self, shard: int, most: int) -> tuple[int, float | None]:
        """Send up to ``most`` of a shard's due deliveries; how many, and when its next is
        due (0.0: more are due now)."""
        hooks = self._settings.webhooks
        lease = int((2 * hooks.timeout + 5) * 1000)
        pending = self._keys.webhooks(shard)
        tried = 0
        while tried < most and not self.stopping:
            due, held = self._take(keys=[pending], args=[int(time.time() * 1000), lease])
            if not due:
                return tried, float(held) / 1000 if held else None
            self._deliver(pending, text(due), text(held))
            tried += 1
        return tried, 0.0

    def _deliver(self, pending: str, delivery: str, held: str) -> None:
        state = text_map(self._redis.hgetall(self._keys.webhook(delivery)))
        hooks = self._settings.webhooks
        endpoint = self._settings.webhook(state.get("owner", ""),
                                          int(state.get("endpoint") or -1))
        status, error = 0, ""
        if not state:
            error = "gone"
        elif endpoint is None or endpoint.secret is None:
            error = "the endpoint is no longer configured"
        else:
            body = state["payload"].encode()
            message_id = json.loads(body)["id"]
            now = int(time.time())
            headers = {"Content-Type": "application/json", "User-Agent": "api-tasks-webhooks",
                       "webhook-id": message_id, "webhook-timestamp": str(now),
                       "webhook-signature": sign(endpoint.secret.get_secret_value(),
                                                 message_id, now, body)}
            try:
                status = self._http.post_guarded(endpoint.url, body, headers, self._guard,
                                                 hooks.timeout)
                if not 200 <= status < 300:  # a redirect too: it is not followed
                    error = f"HTTP {status}"
            except (requests.RequestException, OSError) as err:
                error = scrub(f"{type(err).__name__}: {err}",
                              (endpoint.secret.get_secret_value(),))[:500]
        attempts = int(state.get("attempts") or 0) + 1
        first = float(state.get("first_at") or time.time() * 1000) / 1000
        again = ""
        if error and state and endpoint is not None:
            at = time.time() + retry_delay(attempts, hooks.initial_delay, hooks.max_delay,
                                           random.random())
            if at <= first + hooks.retry_for:
                again = str(int(at * 1000))
        metrics.WEBHOOKS.labels("retrying" if again else "given_up" if error
                                else "delivered").inc()
        if error:
            log.info("webhook %s: attempt %d failed (%s)%s", delivery, attempts, error,
                     "" if again else "; given up")
        self._done(keys=[pending, self._keys.webhook(delivery)],
                   args=[delivery, int(time.time() * 1000), status, error, again, held])
