"""What the cluster knows of each deployment, read for ``python -m api_tasks status``.

The state is written by the routing scripts (``route.lua``, ``routed.lua``) and
the 429 cool-downs; this reads it in one pipeline and parses it, nothing more.
"""

from __future__ import annotations

import time
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import redis

from api_tasks.record.keys import Keys

if TYPE_CHECKING:
    from config.settings import Settings

__all__ = ["BreakerState", "deployment_states"]


class BreakerState(StrEnum):
    """A deployment's circuit breaker."""

    CLOSED = "closed"  # it takes calls
    OPEN = "open"  # skipped until its cool-down ends
    HALF_OPEN = "half_open"  # its cool-down ended: the next call probes it


def deployment_states(client: redis.Redis, keys: Keys, settings: Settings
                      ) -> list[dict[str, Any]]:
    """Each configured deployment, by model group: breaker, calls in flight, cool-down."""
    rows = [(group, deployment) for group in settings.upstreams
            for deployment in group.targets()]
    pipe = client.pipeline(transaction=False)
    now_ms = time.time() * 1000  # the breakers' times are Redis's clock: close enough here
    for group, deployment in rows:
        pipe.hmget(keys.breaker(deployment.name), "open_until", "opened_at")
        pipe.zcount(keys.calls(deployment.name), now_ms, "+inf")
        pipe.zcount(keys.breaker_failures(deployment.name),
                    now_ms - group.breaker.window * 1000, "+inf")
        pipe.pttl(keys.cooldown(deployment.name))
    replies = pipe.execute()
    states = []
    for at, (group, deployment) in enumerate(rows):
        (open_until, opened_at), calls, failures, cool = replies[4 * at: 4 * at + 4]
        several = group.deployments is not None
        until = float(open_until) if open_until else 0.0
        breaker = BreakerState.CLOSED if not until else \
            BreakerState.OPEN if until > now_ms else BreakerState.HALF_OPEN
        states.append({
            "upstream": group.name, "deployment": deployment.name,
            "base_url": deployment.base_url, "weight": deployment.weight,
            "breaker": breaker.value if several else None,
            "open_for": max(until - now_ms, 0.0) / 1000 if breaker is BreakerState.OPEN
            else None,
            "opened_at": float(opened_at) / 1000 if opened_at else None,
            "recent_failures": int(failures) if several else None,  # in its window
            "calls_in_flight": int(calls) if several else None,
            "cooldown": max(int(cool), 0) / 1000})
    return states
