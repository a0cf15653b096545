"""Which deployment of a model group takes a call, and the circuit breakers every worker shares.

A group of one server is routed in-process, at no cost to Redis. A group of
several deployments is routed by one script over their state in Redis: the
deployment whose turn under its own limits and 429 cool-down comes soonest,
then the one with the least expected wait for its weight: calls in flight
times its time to first byte, a moving average that follows a slowdown at
once and decays while unmeasured, so a deployment that turned slow gets
almost nothing until it is tried again (a "peak EWMA"); a deployment the job
already tried is skipped, and so is one whose breaker is open (``failures``
failed calls within ``window`` seconds open it for ``cooldown`` seconds, after
which one probe call at a time decides whether it closes).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis

from api_tasks.connections import text
from api_tasks.execution.limits import pace_args
from api_tasks.record.keys import Keys
from api_tasks.record.scripts import script
from api_tasks.upstream.retry import Health

if TYPE_CHECKING:
    from config.settings import Deployment, Upstream

__all__ = ["Pick", "Router"]

log = logging.getLogger(__name__)
_ROUTE = script("route")
_ROUTED = script("routed")
_DECAY_MS = 10_000  # a deployment's time to first byte fades with this time constant


@dataclass(frozen=True)
class Pick:
    """The deployment for a call (``wait``: seconds to its turn), or none: ``wait`` seconds
    to the soonest breaker probe, or -1 when the job already tried every one."""

    deployment: Deployment | None
    wait: float = 0.0
    probe: bool = False


class Router:
    """Picks each call's deployment, and keeps the deployments' breakers."""

    def __init__(self, client: redis.Redis, keys: Keys, lease_ms: int,
                 rand: Callable[[], float] = random.random) -> None:
        self.keys = keys
        self.lease_ms = lease_ms
        self.rand = rand
        self._route = client.register_script(_ROUTE)
        self._routed = client.register_script(_ROUTED)

    def pick(self, job_id: str, group: Upstream, tried: Collection[str], cost: int,
             model: str | None = None) -> Pick:
        """The deployment of ``group`` with the most room that the job has not tried (for
        ``model``: a deployment that learns its limits keeps them per model)."""
        targets = group.targets()
        if group.deployments is None:  # one server: nothing to choose
            return Pick(None, -1.0) if targets[0].name in tried else Pick(targets[0])
        keys: list[str] = []
        args: list[str | float] = [job_id, self.lease_ms, cost, len(targets), _DECAY_MS]
        for deployment in targets:
            name = deployment.name
            scope = deployment.limits.scope(name, model)  # as the limiter keeps it
            keys += [self.keys.breaker(name), self.keys.calls(name), self.keys.cooldown(name),
                     self.keys.limit(scope), self.keys.in_flight(scope),
                     self.keys.latency(name)]
            req, tok, burst, _, cap = pace_args(deployment.limits)
            # a probe holds the deployment until its call can have ended
            args += ["1" if name in tried else "0", deployment.weight,
                     -math.log(1.0 - self.rand()), req, tok, burst, cap,
                     int(max(group.breaker.cooldown, group.timeouts.total) * 1000)]
        index, wait, probe = self._route(keys=keys, args=args)
        if not int(index):
            return Pick(None, float(wait) / 1000 if float(wait) >= 0 else -1.0)
        chosen = targets[int(index) - 1]
        if text(probe) == "1":
            log.info("deployment %s: its breaker lets one call probe it", chosen.name)
        return Pick(chosen, float(wait) / 1000, text(probe) == "1")

    def calls(self, group: Upstream, deployment: Deployment) -> list[str]:
        """The calls set a call to ``deployment`` holds a slot in (renewed with its lease)."""
        return [] if group.deployments is None else [self.keys.calls(deployment.name)]

    def done(self, job_id: str, attempt: int, group: Upstream, deployment: Deployment,
             verdict: Health, first_byte: float | None, probe: bool = False) -> None:
        """The call ended (``first_byte``: seconds to its answer's headers, None if it got
        none): free its slot, and tell the deployment's breaker and average how it went (a
        probe that never went out lets the next call probe)."""
        if group.deployments is None:
            return
        breaker, name = group.breaker, deployment.name
        try:
            opened = self._routed(
                keys=[self.keys.breaker(name), self.keys.breaker_failures(name),
                      self.keys.calls(name), self.keys.latency(name)],
                args=[job_id, attempt, verdict.value, breaker.failures,
                      int(breaker.window * 1000), int(breaker.cooldown * 1000),
                      "" if first_byte is None else round(first_byte * 1000, 1), _DECAY_MS,
                      "1" if probe else "0"])
        except redis.RedisError as err:  # the call's outcome stands; its slot lapses anyway
            log.warning("deployment %s: the end of job %s's call was not recorded (%s)",
                        name, job_id, err)
            return
        if int(opened):
            log.warning("deployment %s: circuit breaker open for %gs; calls go to the other "
                        "deployments", name, breaker.cooldown)
