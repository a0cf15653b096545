"""The gate a call passes before it goes upstream: the 429 cool-down and the limits.

A call waits here, in its worker, only when its turn is at most
``worker.reserve_ahead`` away; otherwise ``Park`` takes the job out of the
worker (status ``waiting``) until the scheduler sends it again.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from api_tasks import metrics, tracing
from api_tasks.errors import ApiTasksError, CallCancelled, RequestTooLarge, UpstreamError
from api_tasks.execution.delivery import Delivery, Outcome
from api_tasks.execution.limits import Cooldowns, Hold, Limiter
from api_tasks.record.leases import LeaseStore, Parked
from api_tasks.upstream.call_handle import CallHandle

if TYPE_CHECKING:
    from config.settings import Limits

__all__ = ["Gate", "Park", "relook"]

log = logging.getLogger(__name__)
_RELOOK = 1.0  # seconds a job waits outside at least, before it asks a limit again


class Gate:
    """Holds each call until its upstream's cool-down and limits let it go."""

    def __init__(self, limiter: Limiter, cooldowns: Cooldowns, leases: LeaseStore,
                 reserve_ahead: float, counted: frozenset[str] = frozenset()) -> None:
        self.limiter = limiter
        self.cooldowns = cooldowns
        self.leases = leases
        self.ahead = reserve_ahead
        self.counted = counted  # the scopes the settings name: bounded metric labels

    def cooldown(self, run: Delivery, handle: CallHandle, server: str,
                 left: float | None = None) -> None:
        """Hold the call while its deployment ``server`` cools down after a 429 (``left``:
        as already read, by the claim)."""
        if left is None:
            left = self.cooldowns.left(server)
        if left > self.ahead:
            raise Park(left, Hold.COOLDOWN)  # long: wait outside, holding no slot
        if left > 0:
            log.info("job %s waits %.2fs: upstream %s is cooling down after a 429",
                     run.job_id, left, server)
            self.hold(handle, left, Hold.COOLDOWN)

    def breakers(self, run: Delivery, handle: CallHandle, wait: float) -> None:
        """Hold the call until a deployment of its group may be probed (all are open)."""
        if wait > self.ahead:
            raise Park(wait, Hold.BREAKER)
        log.info("job %s waits %.2fs: every deployment of upstream %s has its breaker open",
                 run.job_id, wait, run.target.name)
        self.hold(handle, max(wait, 0.05), Hold.BREAKER)

    def hold(self, handle: CallHandle, seconds: float, reason: Hold) -> None:
        """Wait here; a stopped job stops waiting."""
        metrics.LIMIT_WAIT.labels(reason.value).observe(seconds)
        with tracing.wait_span(reason.value, seconds):
            stopped = handle.wait(seconds)
        if stopped:
            raise handle.error() or CallCancelled("the job was stopped")

    def admit(self, run: Delivery, handle: CallHandle, scopes: list[tuple[str, Limits]],
              cost: int) -> None:
        """Wait for the call's turn under its limits: here if near, else outside the worker."""
        if not scopes:
            return
        too_big = [name for name, limits in scopes
                   if limits.tokens_per_minute and cost > limits.tokens_per_minute]
        if too_big:
            raise RequestTooLarge(f"the call may use {cost} tokens, more than the "
                                  f"tokens_per_minute of {too_big[0]} allow at all")
        ahead = self.ahead
        turn = run.turn if run.calls == 1 else None  # kept while it waited outside
        if turn is not None and turn > ahead:
            raise Park(turn, Hold.TURN, turn)  # sent back early: its turn is still ahead
        # bulk calls never reserve far ahead, so they can't push interactive ones back;
        # they keep their place in line by submit time instead
        horizon = None if run.queue == "interactive" else ahead
        waited = 0.0
        while True:
            admission = self.limiter.admit(run.job_id, scopes, cost, turn is not None, horizon,
                                           None if horizon is None else run.created_at)
            if admission.go and turn is None:  # reserved now (a turn was counted when taken)
                self._count(scopes, cost)
            wait = max(admission.wait, turn or 0.0) if admission.go else admission.wait
            if admission.go and wait > ahead:
                raise Park(wait, admission.reason, wait)  # its place is kept meanwhile
            if not admission.go and not (admission.reason is Hold.CONCURRENCY
                                         and waited + wait <= ahead):
                raise Park(relook(admission.reason, wait), admission.reason, turn)
            if admission.go:
                handle.flights = self.limiter.flights(scopes)
            if wait > 0:
                try:
                    self.hold(handle, wait, admission.reason or Hold.TURN)
                except UpstreamError:
                    if admission.go:
                        self.limiter.settle(run.job_id, scopes, cost, answered=False)  # unused
                    raise
            if admission.go:
                return
            waited += wait

    def _count(self, scopes: list[tuple[str, Limits]], cost: int) -> None:
        """What a call takes of each configured scope's budget, in the metrics."""
        for name, limits in scopes:
            if name in self.counted:
                metrics.LIMIT_USED.labels(name, "requests").inc()
                if limits.tokens_per_minute:  # else the call's tokens were never counted
                    metrics.LIMIT_USED.labels(name, "tokens").inc(cost)

    def park(self, run: Delivery, park: Park) -> Outcome | None:
        """The job leaves this worker to wait for its limit; it is sent again when due. None:
        it was cancelled meanwhile, and is for the caller to end."""
        turn_on = None if run.deployment is None else (run.deployment.name, run.model)
        lead = self.ahead / 2  # a job with a turn is sent again this long before it
        parked = self.leases.park(run.job_id, run.token, park.wait, park.reason,
                                  run.message or run.spec.message_json(run.queue), park.turn,
                                  lead, turn_on)
        if parked is Parked.PARKED:
            log.info("job %s waits %.2fs for its %s limit, outside the worker",
                     run.job_id, park.wait, park.reason)
            # counted as planned, as a wait in the worker is (no worker sees its end); the
            # lead is counted by the delivery that waits it out
            outside = park.wait if park.turn is None else max(park.turn - lead, 0.0)
            metrics.LIMIT_WAIT.labels(park.reason.value).observe(outside)
            tracing.parked(park.reason.value, outside)
            return Outcome.WAITING
        return None if parked is Parked.CANCELLED else Outcome.LOST


class Park(ApiTasksError):
    """The job's turn under a limit is too far off to wait for in a worker."""

    def __init__(self, wait: float, reason: Hold, turn: float | None = None) -> None:
        super().__init__(f"waiting {wait:.2f}s for {reason}")
        self.wait = wait
        self.reason = reason
        self.turn = turn  # seconds to the turn it reserved, if it did


def relook(reason: Hold, wait: float) -> float:
    """How long a job with no reserved turn waits outside before it asks again."""
    if reason in (Hold.CONCURRENCY, Hold.TOKENS):
        # a slot frees whenever a call ends, and token reservations are settled (mostly
        # refunded) as calls end, so the computed wait is pessimistic: look again soon
        return min(wait, _RELOOK) if reason is Hold.TOKENS else _RELOOK
    return max(wait, 0.05)
