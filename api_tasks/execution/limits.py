"""Limits shared by every worker: requests and tokens per minute, calls in flight, 429s.

Each limit scope (an upstream, or the models matching a glob) keeps its
pacing state in Redis, and every admission is one Lua script with the time
read from Redis, O(1) whatever a call costs:

- requests and tokens per minute use GCRA, a token bucket kept as a
  theoretical arrival time; a call reserves its estimated tokens
  (``api_tasks.execution.tokens``) and the reservation is settled with the upstream's
  reported usage once the call ends;
- a call goes once its own cost fits in the bucket, which holds
  ``burst_seconds`` of budget (or the call, if it is bigger), and the limiter
  paces to ``utilization`` of the limit: past the first burst, a steady
  backlog stays under it;
- calls in flight are a sorted set of job ids by lease expiry, renewed with
  the job's lease, so a dead worker's calls stop counting on their own;
- a call whose turn is at most ``worker.reserve_ahead`` away reserves it and
  waits in its worker; an interactive call further away reserves its turn too,
  leaves the worker (status ``waiting``) and is sent again just before it; a
  bulk call never reserves far ahead (so it can't push interactive calls
  back): it keeps its place in the scope's line (a sorted set by submit time)
  instead, and the budget ahead goes to the older jobs in line first (budget free
  right now, beyond what the head of the line needs, goes to whichever job asks:
  unused, it would be lost);
- a 429 (rate limited, not out of quota) holds the whole upstream for every
  worker until the cool-down key in Redis expires.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

import redis
from redis.exceptions import RedisClusterException

from api_tasks.connections import text
from api_tasks.record.keys import Keys, hash_tag
from api_tasks.record.scripts import script
from api_tasks.upstream.rate_headers import Reported, warn_once

if TYPE_CHECKING:
    from config.settings import Limits

__all__ = ["Admission", "Cooldowns", "Hold", "Limiter", "pace_args"]

_COOL = script("cooldown")


class Cooldowns:
    """Reads and sets each upstream's cool-down."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.redis = client
        self.keys = keys
        self._cool = client.register_script(_COOL)

    def start(self, upstream: str, seconds: float) -> None:
        """Hold every call to ``upstream`` for ``seconds`` (or longer, if already held)."""
        if seconds > 0:
            self._cool(keys=[self.keys.cooldown(upstream)], args=[max(int(seconds * 1000), 1)])

    def left(self, upstream: str) -> float:
        """Seconds until calls to ``upstream`` may go again (0 when not cooling down)."""
        millis = int(self.redis.pttl(self.keys.cooldown(upstream)))
        return millis / 1000 if millis > 0 else 0.0


_ADMIT = script("admit")
_SETTLE = script("settle")
_OBSERVE = script("observe")
_GIVE_BACK = script("give_back")
_OUT_OF_REACH = (redis.RedisError, RedisClusterException)  # a give-back lost: its turn lapses


_LINE_GRACE_MS = 15_000  # a job in line that does not ask again within its wait and this
# long has left the line (cancelled, or its message is stuck): the next ones move up


class Hold(StrEnum):
    """What a call waits for (a waiting job's ``waiting_for``)."""

    NOTHING = ""
    REQUESTS = "requests"  # a requests-per-minute limit
    TOKENS = "tokens"  # a tokens-per-minute limit
    CONCURRENCY = "concurrency"  # a max_in_flight limit
    COOLDOWN = "cooldown"  # the upstream's cool-down after a 429
    TURN = "limit"  # the turn it reserved under its limits
    BREAKER = "breaker"  # every deployment of its model group has its circuit breaker open


@dataclass(frozen=True)
class Admission:
    """The limiter's answer: a turn ``wait`` seconds away (``go``), or none yet."""

    go: bool
    wait: float
    reason: Hold


_UNKNOWN = 1e-6  # ms: the interval of a limit not learnt yet (``limits: auto``): none


def pace_args(limits: Limits) -> list[float]:
    """What the scripts take of a scope's limits: ms per request and per token (paced to
    ``utilization``), request and token burst ms, max in flight (0: none)."""
    rpm = (limits.requests_per_minute or 0) * limits.utilization
    tpm = (limits.tokens_per_minute or 0) * limits.utilization
    burst = limits.burst_seconds * 1000
    # a learnt limit paces the scope through its pacing hash (``paced`` in the scripts)
    unset = _UNKNOWN if limits.auto else 0
    return [60000 / rpm if rpm else unset, 60000 / tpm if tpm else unset, burst, burst,
            limits.max_in_flight or 0]


@dataclass(frozen=True)
class _Scope:
    name: str
    limits: Limits

    def args(self) -> list[float]:
        return pace_args(self.limits)


def _correction(limits: Limits, unused: int, answered: bool, counted: int | None) -> int:
    """What the upstream counted of an answered call beyond its reservation (negative: less),
    as the scope's rule has it: the usage, or the arrival charge (``counted``, if known)."""
    if not answered:
        return 0
    if limits.accounting == "usage":
        return -unused
    return counted or 0


def _lower(part: _Scope, unit: str, configured: float | None, told: float | None
           ) -> float | None:
    """The upstream's own limit when it is lower than the scope's (warned once a scope), or
    any it says for a scope that learns its limits; 0 when it said one that is not lower
    (the configured one stands again); None if it said nothing of it."""
    if part.limits.auto:
        return told if told else None
    if configured is None or told is None:
        return None
    if told <= 0 or told >= configured:
        return 0.0
    warn_once((part.name, unit), "limit scope %s: the upstream says its %s limit is %g a "
              "minute, below the %g configured; pacing to the upstream's", part.name, unit,
              told, configured)
    return told


class Limiter:
    """Admits calls under each scope's limits; all state lives in Redis."""

    def __init__(self, client: redis.Redis, keys: Keys, reserve_ahead: float,
                 lease_ms: int, horizon: float = 300.0) -> None:
        self.keys = keys
        self.reserve_ms = int(reserve_ahead * 1000)
        self.horizon_ms = int(horizon * 1000)
        self.lease_ms = lease_ms
        self._admit = client.register_script(_ADMIT)
        self._settle = client.register_script(_SETTLE)
        self._observe = client.register_script(_OBSERVE)
        self._give = client.register_script(_GIVE_BACK)

    def flights(self, scopes: list[tuple[str, Limits]]) -> list[str]:
        """The in-flight sets a call under these scopes holds a slot in."""
        return [self.keys.in_flight(name) for name, limits in scopes if limits.max_in_flight]

    def admit(self, job_id: str, scopes: list[tuple[str, Limits]], cost: int,
              reserved: bool = False, horizon: float | None = None,
              place: float | None = None) -> Admission:
        """Reserve the call's turn (``go``: its place is kept, ``wait`` seconds away).

        ``reserved``: the job already holds a turn (it waited outside a worker); it
        only needs its slot in flight. ``place`` (the job's submit time) puts a job that
        reserves no turn ahead in line: the budget goes to the older jobs in line first.
        """
        if not scopes:
            return Admission(True, 0.0, Hold.NOTHING)
        taken: list[list[_Scope]] = []
        worst = Admission(True, 0.0, Hold.NOTHING)
        # scopes on different slots (a gateway key's own beside its upstream group's, on a
        # Redis Cluster) are admitted a slot at a time: a turn that a later slot refuses is
        # given back, and the call goes at the latest turn any gave
        refused: Admission | None = None
        try:
            for parts in self._by_slot(scopes):
                admission = self._admit_in(parts, job_id, cost, reserved, horizon, place)
                if not admission.go:
                    refused = admission
                    break
                taken.append(parts)
                if admission.wait >= worst.wait:
                    worst = admission
        except Exception:
            with contextlib.suppress(*_OUT_OF_REACH):  # the error says what went wrong
                self._give_back(job_id, taken, cost, reserved)
            raise
        if refused is not None:
            self._give_back(job_id, taken, cost, reserved)
            return refused
        if len(taken) > 1 and worst.wait * 1000 > self.reserve_ms:
            # a slot that took a place in flight for its own near turn: the call waits for
            # a later one, so it holds none meanwhile (as one script would have taken none)
            with contextlib.suppress(*_OUT_OF_REACH):  # it lapses with the lease anyway
                self._give_back(job_id, taken, cost, reserved=True)
        return worst

    def _admit_in(self, parts: list[_Scope], job_id: str, cost: int, reserved: bool,
                  horizon: float | None, place: float | None) -> Admission:
        """``admit`` under scopes that share a slot: one script."""
        keys = [key for part in parts for key in (
            self.keys.limit(part.name), self.keys.in_flight(part.name),
            self.keys.line(part.name), self.keys.line_until(part.name),
            self.keys.line_costs(part.name))]
        verdict, wait, reason = self._admit(
            keys=keys,
            args=[job_id, cost, self.reserve_ms,
                  self.horizon_ms if horizon is None else int(horizon * 1000), self.lease_ms,
                  "1" if reserved else "0", len(parts),
                  "" if place is None else int(place * 1000), _LINE_GRACE_MS,
                  *[value for part in parts for value in part.args()]])
        return Admission(text(verdict) == "turn", float(wait) / 1000, Hold(text(reason)))

    def _give_back(self, job_id: str, taken: list[list[_Scope]], cost: int,
                   reserved: bool) -> None:
        """Undo the turns ``_admit_in`` just gave under each group of scopes (only their
        places in flight, if the job held its turn already)."""
        for parts in taken:
            self._give(keys=self._keys(parts), args=[job_id, 0 if reserved else cost, *[
                0 if reserved else value for part in parts for value in part.args()[:2]]])

    def _by_slot(self, scopes: list[tuple[str, Limits]]) -> list[list[_Scope]]:
        """The scopes as groups that share a slot, in the order given (one group but on a
        Redis Cluster's layout, ``redis.shards`` > 1)."""
        groups: dict[str, list[_Scope]] = {}
        for name, limits in scopes:
            groups.setdefault(hash_tag(self.keys.limit(name)), []).append(_Scope(name, limits))
        return list(groups.values())

    def settle(self, job_id: str, scopes: list[tuple[str, Limits]], unused: int,
               answered: bool = True, counted: int | None = None) -> None:
        """The call ended: free its slot, charge what it overran, and give back what it did
        not use where a scope counts usage; a scope counting on arrival keeps it, unless the
        upstream never took the call (not ``answered``: refused, or never sent). ``counted``:
        how many more tokens than it reserved an upstream counting on arrival charged it (its
        reported prompt plus the reply's ceiling, less the reservation), to correct what the
        scope knows it spent (``observe``)."""
        for parts in self._by_slot(scopes):
            self._settle(keys=self._keys(parts), args=[job_id, *[
                value for part in parts for value in (
                    part.args()[1], unused if part.limits.accounting == "usage"
                    or not answered else min(unused, 0),
                    _correction(part.limits, unused, answered, counted))]])

    def observe(self, scopes: list[tuple[str, Limits]], reported: Reported,
                model: str = "", cost: int | None = None) -> None:
        """The upstream said what it has left (for ``model``: providers count per model),
        and its limits: no scope draws its reserve down, a model's scope paces no faster
        than the upstream's own limit, and none faster than what other callers on the key
        leave it. ``cost``: the tokens the call reserved, if the upstream took it."""
        if not reported.said:
            return
        for parts in self._by_slot([(name, limits) for name, limits in scopes
                                    if limits.tokens_per_minute or limits.requests_per_minute
                                    or limits.auto]):
            self._observe_in(parts, reported, model, cost)

    def _observe_in(self, parts: list[_Scope], reported: Reported, model: str,
                    cost: int | None) -> None:
        """``observe`` for scopes that share a slot: one script."""
        args: list[str | float] = []
        for part in parts:
            # an upstream-wide scope may serve several models, each with its own limit
            own = "/" in part.name
            lower = [_lower(part, "requests", part.limits.requests_per_minute,
                            reported.limit_requests if own else None),
                     _lower(part, "tokens", part.limits.tokens_per_minute,
                            reported.limit_tokens if own else None)]
            args += [*part.args()[:3], *("" if left is None else repr(left) for left in (
                reported.remaining_requests, reported.remaining_tokens)),
                *("" if told is None else "0" if not told else
                  repr(60000 / (told * part.limits.utilization)) for told in lower),
                *("" if reset is None else repr(reset * 1000) for reset in (
                    reported.reset_requests, reported.reset_tokens)),
                part.limits.utilization, 0 if cost is None else 1, cost or 0]
        self._observe(keys=[self.keys.limit(part.name) for part in parts],
                      args=[model, *args])

    def _keys(self, parts: list[_Scope]) -> list[str]:
        return [key for part in parts
                for key in (self.keys.limit(part.name), self.keys.in_flight(part.name))]

