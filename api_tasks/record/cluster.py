"""What the cluster's state is right now, read from Redis in two round trips (for metrics).

Queue depth per lane, jobs waiting and running, batches running, workers alive,
each deployment's breaker and load, and for each configured limit scope how far
ahead it is booked, what it has spent and how many jobs stand in its line. Cheap
whatever the load: lengths and cardinalities, no scans.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis

from api_tasks.connections import connect
from api_tasks.record.deployments import deployment_states
from api_tasks.record.keys import Keys
from api_tasks.record.workers import STALE_AFTER
from config.settings import QUEUES as LANES

if TYPE_CHECKING:
    from config.settings import Limits, Settings

__all__ = ["cluster_reader", "cluster_state", "limit_budgets", "limit_scopes"]


def limit_scopes(settings: Settings) -> list[str]:
    """The limit scopes the settings name (not the per-model ones ``limits: auto`` learns)."""
    return [scope for scope, _ in _named(settings)]


def limit_budgets(settings: Settings) -> dict[tuple[str, str], float]:
    """Each named scope's budget a minute, by (scope, ``requests`` or ``tokens``)."""
    budgets = {}
    for scope, limits in _named(settings):
        for unit, per_minute in (("requests", limits.requests_per_minute),
                                 ("tokens", limits.tokens_per_minute)):
            if per_minute:
                budgets[(scope, unit)] = per_minute
    return budgets


def _named(settings: Settings) -> list[tuple[str, Limits]]:
    return [pair for group in settings.upstreams for pair in group.named_scopes()] + \
        settings.gateway.named_scopes()


def cluster_state(client: redis.Redis, keys: Keys, settings: Settings,
                  broker: redis.Redis | None = None) -> dict[str, Any]:
    """The cluster's gauges, by name (``api_tasks.metrics.ClusterCollector`` exports them):
    one pipeline for the counts and the limits, one for the deployments (and one for the
    queues' lengths on the ``broker``'s Redis, when it is not the state's)."""
    now = time.time()
    scopes = limit_scopes(settings)
    pipe = client.pipeline(transaction=False)
    queues = pipe if broker is None else broker.pipeline(transaction=False)
    for lane in LANES:
        queues.llen(keys.queue(lane))
    pipe.zcount(keys.workers(), int((now - STALE_AFTER) * 1000), "+inf")
    for shard in keys.every_shard:
        pipe.zcard(keys.delayed(shard))
        pipe.zcard(keys.running(shard))
        pipe.scard(keys.batches(shard))
    for scope in scopes:
        pipe.hmget(keys.limit(scope), "req", "tok", "used_req", "used_tok")
        # entries lapse unless their jobs ask again: only those still in line
        pipe.zcount(keys.line_until(scope), int(now * 1000), "+inf")
    replies = pipe.execute() if broker is None else queues.execute() + pipe.execute()
    lanes, (workers, *rest) = replies[:len(LANES)], replies[len(LANES):]
    counts, rest = rest[:3 * keys.shards], rest[3 * keys.shards:]
    waiting, running, batches = (sum(counts[i::3]) for i in range(3))
    limits: dict[tuple[str, str], float] = {}
    used: dict[tuple[str, str], int] = {}
    lines: dict[str, int] = {}
    for at, scope in enumerate(scopes):
        (req, tok, used_req, used_tok), lines[scope] = rest[2 * at: 2 + 2 * at]
        for unit, tat, spent in (("requests", req, used_req), ("tokens", tok, used_tok)):
            if tat is not None:
                limits[(scope, unit)] = max(float(tat) - now * 1000, 0.0) / 1000
                used[(scope, unit)] = int(float(spent or 0))
    return {"queues": dict(zip(LANES, lanes, strict=True)), "waiting": waiting,
            "running": running, "batches_running": batches, "workers_alive": workers,
            "deployments": deployment_states(client, keys, settings), "limits": limits,
            "limits_used": used, "lines": lines}


def cluster_reader(settings: Settings, keys: Keys) -> Callable[[], dict[str, Any]]:
    """``cluster_state`` for a process's scrapes, over a connection of their own that gives up
    quickly: a hung Redis costs a scrape the cluster's gauges only, never a job's slot."""
    clients: list[redis.Redis | None] = []
    building = threading.Lock()  # two first scrapes at once build one pair of clients

    def read() -> dict[str, Any]:
        with building:
            if not clients:  # built at the first scrape: a Redis Cluster's client asks a
                # node for the slots when built, and a process must start while Redis is away
                clients[:] = [connect(settings.redis.state(), max_connections=2,
                                      socket_timeout=2.0),
                              connect(settings.redis, max_connections=2, socket_timeout=2.0)
                              if settings.redis.split else None]
        client, broker = clients
        assert client is not None
        return cluster_state(client, keys, settings, broker)
    return read
