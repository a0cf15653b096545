"""Limits shared by every worker: requests and tokens per minute, calls in flight, 429s.

Each limit scope (an upstream, or the models matching a glob) keeps its
pacing state in Redis, and every admission is one Lua script with the time
read from Redis, O(1) whatever a call costs:

- requests and tokens per minute use GCRA, a token bucket kept as a
  theoretical arrival time; a call reserves its estimated tokens
  (``api_tasks.tokens``) and the reservation is settled with the upstream's
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

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

import redis

from api_tasks.connections import text
from api_tasks.keys import Keys

if TYPE_CHECKING:
    from config.settings import Limits

__all__ = ["Admission", "Cooldowns", "Hold", "Limiter"]

# KEYS: cooldown. ARGV: ms. Only ever lengthens a cool-down, never shortens one.
_COOL = """
local left = redis.call('PTTL', KEYS[1])
if left < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], '1', 'PX', ARGV[1]) end
return 1
"""


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


_NOW = "local t = redis.call('TIME')\nlocal now = t[1] * 1000 + math.floor(t[2] / 1000)\n"

# KEYS: per scope, its pacing hash, in-flight set, line, line expiries and line costs.
# ARGV: job id, cost, reserve_ms, horizon_ms, lease_ms, already reserved ('1': only take
# a slot in flight), scopes, place in line (ms; '' = not in line), line grace ms, then
# per scope: request interval ms, token interval ms, request burst ms, token burst ms,
# max in flight (0 = no such limit). Returns {verdict, wait ms, reason}: 'turn' means
# the turn is reserved, that long from now (a slot in flight is taken only if it is
# within reserve_ms); 'wait' means nothing was reserved (full in flight, too far, or
# older jobs in line first).
_ADMIT = _NOW + """
local id, cost, reserve = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local reserved, scopes, place = ARGV[6] == '1', tonumber(ARGV[7]), tonumber(ARGV[8])
local wait, reason, lates, aheads, behind = 0, '', {}, {}, false
local function key(i, n) return KEYS[5 * (i - 1) + n] end  -- n: pace, flight, line, till, costs
local function arg(i, k) return tonumber(ARGV[9 + (i - 1) * 5 + k]) end
local function leave(i, who)
  redis.call('ZREM', key(i, 3), who)
  redis.call('ZREM', key(i, 4), who)
  redis.call('HDEL', key(i, 5), who)
end
local function older(i)
  -- how many jobs in this scope's line came before this one, and the first one's cost
  -- (entries lapse unless their jobs come back to ask again)
  if not place or reserved then return 0, 0 end
  for _, gone in ipairs(redis.call('ZRANGEBYSCORE', key(i, 4), '-inf', now, 'LIMIT', 0, 100)) do
    leave(i, gone)
  end
  local count = redis.call('ZCOUNT', key(i, 3), '-inf', '(' .. ARGV[8])
  if count == 0 then return 0, 0 end
  local head = redis.call('ZRANGE', key(i, 3), 0, 0)[1]
  return count, tonumber(redis.call('HGET', key(i, 5), head) or '0')
end
for i = 1, scopes do
  local pace, flight = key(i, 1), key(i, 2)
  if arg(i, 5) > 0 then
    redis.call('ZREMRANGEBYSCORE', flight, '-inf', now)
    if not redis.call('ZSCORE', flight, id) and redis.call('ZCARD', flight) >= arg(i, 5) then
      for j = 1, scopes do  -- waiting for a slot, it keeps whatever place in line it has
        redis.call('ZADD', key(j, 4), 'XX', now + 1000 + tonumber(ARGV[9]), id)
      end
      return {'wait', '200', 'concurrency'}
    end
  end
  local ahead, head_cost = older(i)
  lates[i], aheads[i] = 0, ahead
  for k, field in ipairs({'req', 'tok'}) do
    if arg(i, k) > 0 and not reserved then
      -- pay before: the call's own cost must fit in the bucket (a call bigger than
      -- the burst fits once the bucket is full), after the older jobs in line; but
      -- budget free now, beyond what the head of the line needs, goes to whoever
      -- asks: unused, it would be lost
      local tat = math.max(tonumber(redis.call('HGET', pace, field) or '0'), now)
      local unit = arg(i, k) * (field == 'req' and 1 or cost)
      local kept = arg(i, k) * (field == 'req' and 1 or head_cost)
      local late = tat + unit - math.max(arg(i, k + 2), unit) - now
      if ahead > 0 and late + math.max(unit, kept) > 0 then
        late, behind = late + unit * ahead, true
      end
      lates[i] = math.max(lates[i], late)
      if late > wait then wait, reason = late, field == 'req' and 'requests' or 'tokens' end
    end
  end
end
if wait > 0 then  -- a job that must wait anyway takes no turn ahead of older ones
  for i = 1, scopes do
    if aheads[i] > 0 then behind, lates[i] = true, math.max(lates[i], 1) end
  end
end
local function queue_up()
  -- in the line of each scope it waits for, and only those: a job held by one model's
  -- limit must not hold up the other models under the same upstream
  if not place or reserved then return end
  for i = 1, scopes do
    if lates[i] > 0 then
      redis.call('ZADD', key(i, 3), 'NX', place, id)
      redis.call('ZADD', key(i, 4), now + wait + tonumber(ARGV[9]), id)
      redis.call('HSET', key(i, 5), id, cost)
      for n = 3, 5 do redis.call('PEXPIRE', key(i, n), 3600000) end
    else
      leave(i, id)
    end
  end
end
-- a token wait is pessimistic (reservations are settled with usage when calls end),
-- so far token turns are not reserved: the job looks again soon instead; and a job
-- behind older ones in line books nothing ahead of them
if wait > tonumber(ARGV[4]) or (reason == 'tokens' and wait > reserve) or behind then
  queue_up()
  return {'wait', tostring(wait), reason}
end
for i = 1, scopes do
  local pace, flight = key(i, 1), key(i, 2)
  for k, field in ipairs({'req', 'tok'}) do
    if arg(i, k) > 0 and not reserved then
      local tat = math.max(tonumber(redis.call('HGET', pace, field) or '0'), now)
      redis.call('HSET', pace, field, tostring(tat + arg(i, k) * (field == 'req' and 1 or cost)))
      redis.call('PEXPIRE', pace, 3600000)
    end
  end
  if arg(i, 5) > 0 and wait <= reserve then
    redis.call('ZADD', flight, now + wait + tonumber(ARGV[5]), id)
    redis.call('PEXPIRE', flight, 3600000)
  end
  leave(i, id)
end
return {'turn', tostring(wait), reason}
"""

# KEYS: per scope, its pacing hash then its in-flight set. ARGV: job id, unused tokens
# (negative when the call used more than it reserved), then per scope the token interval
# ms. Frees the call's slot, gives back what it did not use, charges what it overran.
_SETTLE = _NOW + """
local unused = tonumber(ARGV[2])
for i = 1, #KEYS / 2 do
  local pace, interval = KEYS[2 * i - 1], tonumber(ARGV[2 + i])
  redis.call('ZREM', KEYS[2 * i], ARGV[1])
  local tat = tonumber(redis.call('HGET', pace, 'tok') or '0')
  if interval > 0 and unused > 0 and tat > now then
    redis.call('HSET', pace, 'tok', tostring(math.max(tat - unused * interval, now)))
  elseif interval > 0 and unused < 0 then
    redis.call('HSET', pace, 'tok', tostring(math.max(tat, now) - unused * interval))
  end
end
return 1
"""


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


@dataclass(frozen=True)
class Admission:
    """The limiter's answer: a turn ``wait`` seconds away (``go``), or none yet."""

    go: bool
    wait: float
    reason: Hold


@dataclass(frozen=True)
class _Scope:
    name: str
    limits: Limits

    def args(self) -> list[float]:
        rpm = (self.limits.requests_per_minute or 0) * self.limits.utilization
        tpm = (self.limits.tokens_per_minute or 0) * self.limits.utilization
        burst = self.limits.burst_seconds * 1000
        return [60000 / rpm if rpm else 0, 60000 / tpm if tpm else 0, burst, burst,
                self.limits.max_in_flight or 0]


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
        parts = [_Scope(name, limits) for name, limits in scopes]
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

    def settle(self, job_id: str, scopes: list[tuple[str, Limits]], unused: int) -> None:
        """The call ended: free its slot and give back the tokens it did not use."""
        if scopes:
            parts = [_Scope(name, limits) for name, limits in scopes]
            self._settle(keys=self._keys(parts),
                         args=[job_id, unused, *[part.args()[1] for part in parts]])

    def _keys(self, parts: list[_Scope]) -> list[str]:
        return [key for part in parts
                for key in (self.keys.limit(part.name), self.keys.in_flight(part.name))]

