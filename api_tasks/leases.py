"""Exactly one outcome per job: claims, leases, and the fenced finish.

A worker claims a job before calling the upstream: the claim writes a fresh
attempt token into the job record and takes a lease (a key that expires
unless the worker renews it). Then:

- a second delivery of a finished job is dropped; one of a job whose lease
  another token holds is deferred until that lease would lapse (never acked
  while it may be the job's only message, as after a failed give-back);
- only the attempt whose token is in the record may finish the job, so a
  worker that lost its job to a new attempt can't write a second result;
- a claim retried after a lost reply finds its own token and goes on;
- the reaper (``api_tasks.reaper``) gives back the unacked messages of jobs
  whose lease lapsed: their worker is gone; and a running job whose lease
  and message are both gone is sent again from the copy its claim kept;
- a job whose worker died ``jobs.max_crashes`` times is a poison job.

All of it is Lua, so it holds across any number of processes and machines.
Every script checks its inputs before its first write: Redis does not undo
a script that fails halfway.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis

from api_tasks.connections import text
from api_tasks.events import EVENT_FIELD, TERMINAL
from api_tasks.keys import Keys
from api_tasks.writer import Command

__all__ = ["Claim", "LeaseStore", "Verdict"]

_DEFER_MARGIN_MS = 250  # a deferred delivery looks again this long after the lease would lapse
_HOLD_MS = 30_000  # a due job being sent is due again after this, should its sender die
_RETRY_MS = 1_000  # a due job whose send failed is due again after this

# KEYS: job, cancel, lease, the upstream's cool-down, events, running index, running
# messages. ARGV: now, ttl, token, lease_ms, max_crashes, the task message ('' = none), job
# id, then field/value pairs for a job nobody recorded (a plain Celery client's). The
# message is kept while the job runs, so a job whose message is lost can be sent again.
# Returns {verdict, delivery, created_at, cool-down ms left, ms to a reserved turn or '',
# whether the job's stream has events}.
_CLAIM = """
local s = redis.call('HGET', KEYS[1], 'status')
local created = redis.call('HGET', KEYS[1], 'created_at') or ARGV[1]
local cool = tostring(math.max(redis.call('PTTL', KEYS[4]), 0))
local t = redis.call('TIME')
local turn = redis.call('HGET', KEYS[1], 'turn_at')
turn = turn and tostring(tonumber(turn) - (t[1] * 1000 + math.floor(t[2] / 1000))) or ''
local shown = tostring(redis.call('EXISTS', KEYS[5]))
if s == 'succeeded' or s == 'failed' or s == 'cancelled' then
  return {s, '0', created, cool, turn, shown}
end
local holder = redis.call('GET', KEYS[3])
if holder == ARGV[3] then
  return {'run', redis.call('HGET', KEYS[1], 'deliveries') or '1', created, cool, turn, shown}
end
if holder then return {'busy', '0', created, cool, turn, shown} end
if not s then redis.call('HSET', KEYS[1], 'created_at', ARGV[1], unpack(ARGV, 8)) end
local n = redis.call('HINCRBY', KEYS[1], 'deliveries', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[1], 'token', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[4])
redis.call('ZADD', KEYS[6], t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[4]), ARGV[7])
redis.call('EXPIRE', KEYS[6], ARGV[2])
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[7], ARGV[7], ARGV[6])
  redis.call('EXPIRE', KEYS[7], ARGV[2])
end
local verdict = 'run'
if redis.call('EXISTS', KEYS[2]) == 1 then verdict = 'cancel'
elseif tonumber(redis.call('HGET', KEYS[1], 'crashes') or '0') >= tonumber(ARGV[5]) then
  verdict = 'poison'
end
redis.call('HDEL', KEYS[1], 'turn_at')
return {verdict, tostring(n), created, cool, turn, shown}
"""

# KEYS: job, lease, running index, then the in-flight sets the call holds a slot in.
# ARGV: token, lease_ms, job id. Also re-takes a lease that lapsed while Redis was away, as long as
# the record still names this attempt; in-flight slots live as long as the lease.
# Returns 1 (renewed), 0 (this attempt itself ended, parked or released the job a moment
# ago: ``ended_by`` names it) or -1 (lost: another attempt took it, or the record is gone).
_RENEW = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then
  if redis.call('HGET', KEYS[1], 'ended_by') == ARGV[1] then return 0 end
  return -1
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
local t = redis.call('TIME')
local until_ms = t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[2])
for i = 3, #KEYS do redis.call('ZADD', KEYS[i], 'XX', until_ms, ARGV[3]) end
return 1
"""

# KEYS: job, lease, running index, running messages. ARGV: token, job id. The worker
# stops: the job goes back to its queue.
_RELEASE = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'status', 'queued', 'ended_by', ARGV[1])
redis.call('HDEL', KEYS[1], 'token')
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('HDEL', KEYS[4], ARGV[2])
return 1
"""

# KEYS: unacked index, unacked hash, job, lease, queue, running index, running messages.
# ARGV: delivery tag, message, job id.
# Gives a dead worker's unacked message back to its queue, unless a live lease
# says its job is still running; a message of a finished job is just dropped.
_RESTORE = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then return 'gone' end
if redis.call('EXISTS', KEYS[4]) == 1 then return 'alive' end
local s = redis.call('HGET', KEYS[3], 'status')
local ended = s == 'succeeded' or s == 'failed' or s == 'cancelled'
if not ended then
  if s == 'running' then
    redis.call('HINCRBY', KEYS[3], 'crashes', 1)
    redis.call('HSET', KEYS[3], 'status', 'queued')
    redis.call('HDEL', KEYS[3], 'token')
  end
  redis.call('ZREM', KEYS[6], ARGV[3])
  redis.call('HDEL', KEYS[7], ARGV[3])
  redis.call('RPUSH', KEYS[5], ARGV[2])
end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
if ended then return 'ended' end
return 'restored'
"""

# KEYS: job, lease, delayed set, delayed messages, running index, running messages.
# ARGV: token, job id, wait ms, reason,
# message, ttl, turn ms from now ('' = none reserved), lead ms. The job leaves its worker
# to wait for a limit and is sent again ``lead`` before its turn (or when due).
_PARK = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local due = now + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'status', 'waiting', 'waiting_until', tostring(due / 1000),
           'waiting_for', ARGV[4])
if ARGV[7] ~= '' then
  redis.call('HSET', KEYS[1], 'turn_at', tostring(now + tonumber(ARGV[7])))
  due = math.max(now + tonumber(ARGV[7]) - tonumber(ARGV[8]), now)
else
  redis.call('HDEL', KEYS[1], 'turn_at')
end
redis.call('HSET', KEYS[1], 'ended_by', ARGV[1])
redis.call('HDEL', KEYS[1], 'token')
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[5], ARGV[2])
redis.call('HDEL', KEYS[6], ARGV[2])
redis.call('ZADD', KEYS[3], due, ARGV[2])
redis.call('HSET', KEYS[4], ARGV[2], ARGV[5])
redis.call('EXPIRE', KEYS[3], ARGV[6])
redis.call('EXPIRE', KEYS[4], ARGV[6])
return 1
"""

# KEYS: delayed set, delayed messages. ARGV: limit, hold ms. Returns the due jobs with
# their messages and holds each for ``hold`` ms (its score moves on, so no other worker
# sends it meanwhile); a sender that dies before ``_SENT`` leaves it due again, not lost.
_DUE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, ARGV[1])
local out = {}
for _, id in ipairs(ids) do
  local message = redis.call('HGET', KEYS[2], id)
  if message then
    local held = now + tonumber(ARGV[2])
    redis.call('ZADD', KEYS[1], held, id)
    table.insert(out, id)
    table.insert(out, message)
    table.insert(out, tostring(held))
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return out
"""

# KEYS: delayed set, delayed messages. ARGV: job id, the score ``_DUE`` held it at, retry
# ms ('' when it was sent). Drops the entry and message unless the job was parked or
# deferred again meanwhile (its score moved); a failed send is due again after ``retry``.
_SENT = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) ~= tonumber(ARGV[2]) then return 0 end
if ARGV[3] ~= '' then
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[1], t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[3]),
             ARGV[1])
  return 0
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"""

# KEYS: job, lease, delayed set, delayed messages. ARGV: job id, message, margin ms, ttl.
# A delivery that found the job held by another attempt: the job is looked at again when
# that lease would lapse, so a holder that gave its message back without its lease (a
# failed give-back) cannot leave the job with no message. Returns 1, or 0 if the lease is
# already gone (claim again).
_DEFER = """
local left = redis.call('PTTL', KEYS[2])
if left < 0 then return 0 end
local t = redis.call('TIME')
local due = t[1] * 1000 + math.floor(t[2] / 1000) + left + tonumber(ARGV[3])
redis.call('ZADD', KEYS[3], 'NX', due, ARGV[1])
redis.call('HSETNX', KEYS[4], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[3], ARGV[4])
redis.call('EXPIRE', KEYS[4], ARGV[4])
return 1
"""

# KEYS: running index, job, lease, delayed set, delayed messages, running messages. ARGV:
# job id, ttl. A job whose lease lapsed a while ago (the unacked sweep had its chance
# first): if it is still running it lost its worker and its message, so it counts a crash
# and is sent again from the message its claim kept. Returns 'alive', 'gone' or
# 'recovered'.
_RECOVER = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local left = redis.call('PTTL', KEYS[3])
if left > 0 then
  redis.call('ZADD', KEYS[1], 'XX', now + left, ARGV[1])
  return 'alive'
end
redis.call('ZREM', KEYS[1], ARGV[1])
local message = redis.call('HGET', KEYS[6], ARGV[1])
redis.call('HDEL', KEYS[6], ARGV[1])
if redis.call('HGET', KEYS[2], 'status') ~= 'running' or not message then return 'gone' end
redis.call('HSET', KEYS[2], 'status', 'queued')
redis.call('HINCRBY', KEYS[2], 'crashes', 1)
redis.call('HDEL', KEYS[2], 'token')
redis.call('ZADD', KEYS[4], 'NX', now, ARGV[1])
redis.call('HSETNX', KEYS[5], ARGV[1], message)
redis.call('EXPIRE', KEYS[4], ARGV[2])
redis.call('EXPIRE', KEYS[5], ARGV[2])
return 'recovered'
"""

# KEYS: job, result, events, channel, lease, running index, running messages. ARGV:
# token ('' = whoever
# holds it, for the last-resort failure), ttl, event, wanted entry id, result ('' for
# none), job id, then job field/value pairs. A job already ended is never written twice.
_FINISH = """
local s = redis.call('HGET', KEYS[1], 'status')
if s == 'succeeded' or s == 'failed' or s == 'cancelled' then return 'ended' end
if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 'lost' end
local id = ARGV[4]
local last = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)[1]
if last then
  local la, ls = string.match(last[1], '(%d+)-(%d+)')
  local wa, ws = string.match(id, '(%d+)-(%d+)')
  la, ls, wa, ws = tonumber(la), tonumber(ls), tonumber(wa), tonumber(ws)
  if wa < la or (wa == la and ws <= ls) then id = la .. '-' .. (ls + 1) end
end
redis.call('HSET', KEYS[1], unpack(ARGV, 7))
if ARGV[1] ~= '' then redis.call('HSET', KEYS[1], 'ended_by', ARGV[1]) end
redis.call('HDEL', KEYS[1], 'token')
redis.call('ZREM', KEYS[6], ARGV[6])
redis.call('HDEL', KEYS[7], ARGV[6])
redis.call('EXPIRE', KEYS[1], ARGV[2])
if ARGV[5] ~= '' then redis.call('SET', KEYS[2], ARGV[5], 'EX', ARGV[2]) end
redis.call('XADD', KEYS[3], id, '""" + EVENT_FIELD + """', ARGV[3])
redis.call('EXPIRE', KEYS[3], ARGV[2])
redis.call('PUBLISH', KEYS[4], ARGV[3])
redis.call('DEL', KEYS[5])
return 'ok'
"""


def _dumps(message: dict[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"))


class Verdict(StrEnum):
    """What a claim found."""

    RUN = "run"  # this attempt holds the job now: call the upstream
    CANCEL = "cancel"  # this attempt holds it, and it was cancelled before it started
    POISON = "poison"  # this attempt holds it, and its workers died max_crashes times
    BUSY = "busy"  # another attempt holds its lease
    ENDED = "ended"  # it has ended (``Claim.ended`` says how)

    @property
    def owned(self) -> bool:
        """Whether this attempt now holds the job (and must end or give it back)."""
        return self in (Verdict.RUN, Verdict.CANCEL, Verdict.POISON)


@dataclass(frozen=True)
class Claim:
    """What a worker learned when it claimed a job."""

    verdict: Verdict
    delivery: int
    created_at: float
    cooldown: float = 0.0  # seconds the job's upstream is still cooling down (429)
    turn: float | None = None  # seconds to the turn it reserved under its limits, if any
    has_events: bool = False  # an earlier attempt wrote to the job's stream
    ended: str | None = None  # the final status, for ``Verdict.ENDED``


class LeaseStore:
    """The worker side of a job's record: claim, renew, release, restore, finish."""

    def __init__(self, client: redis.Redis, keys: Keys, queued_ttl: int,
                 lease_ms: int, max_crashes: int) -> None:
        self.redis = client
        self.keys = keys
        self.queued_ttl = queued_ttl
        self.lease_ms = lease_ms
        self.max_crashes = max_crashes
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._restore = client.register_script(_RESTORE)
        self._park = client.register_script(_PARK)
        self._due = client.register_script(_DUE)
        self._sent = client.register_script(_SENT)
        self._defer = client.register_script(_DEFER)
        self._recover = client.register_script(_RECOVER)

    def claim(self, job_id: str, token: str, fields: dict[str, str], now: float,
              upstream: str = "", message: dict[str, Any] | None = None) -> Claim:
        """Take the job for attempt ``token``, unless it is finished or held.

        ``message`` (the task message) stays in the record while the job runs, so the
        job can be sent again if its own message is lost.
        """
        keys = self.keys
        flat = [item for pair in fields.items() for item in pair]
        verdict, delivery, created, cool, turn, shown = self._claim(
            keys=[keys.job(job_id), keys.cancel(job_id), keys.lease(job_id),
                  keys.cooldown(upstream), keys.events(job_id), keys.running(),
                  keys.running_messages()],
            args=[repr(now), self.queued_ttl, token, self.lease_ms, self.max_crashes,
                  _dumps(message) if message is not None else "", job_id, *flat])
        found = text(verdict)
        ended = found if found in TERMINAL else None
        return Claim(Verdict.ENDED if ended else Verdict(found), int(delivery), float(created),
                     int(cool) / 1000, None if not turn else float(turn) / 1000,
                     text(shown) == "1", ended)

    def renew(self, client: redis.Redis,
              held: list[tuple[str, str, list[str]]]) -> list[str]:
        """Renew leases (and slots in flight) of (job id, token, in-flight keys); return
        the job ids another attempt took over (not those this attempt just ended)."""
        pipe = client.pipeline(transaction=False)
        for job_id, token, flights in held:
            self._renew(keys=[self.keys.job(job_id), self.keys.lease(job_id),
                              self.keys.running(), *flights],
                        args=[token, self.lease_ms, job_id], client=pipe)
        results = pipe.execute()
        return [job_id for (job_id, _, _), ok in zip(held, results, strict=True) if ok == -1]

    def release(self, job_id: str, token: str) -> bool:
        """Give a job back (the worker is stopping); True if it was still ours."""
        keys = self.keys
        return bool(self._release(keys=[keys.job(job_id), keys.lease(job_id), keys.running(),
                                        keys.running_messages()], args=[token, job_id]))

    def restore(self, tag: str, job_id: str, queue: str, message: str) -> str:
        """Put an unacked message back on its queue if its job's lease lapsed."""
        celery = self.keys.celery_prefix()
        return text(self._restore(
            keys=[celery + "unacked_index", celery + "unacked", self.keys.job(job_id),
                  self.keys.lease(job_id), celery + queue, self.keys.running(),
                  self.keys.running_messages()],
            args=[tag, message, job_id]))

    def park(self, job_id: str, token: str, wait: float, reason: str,
             message: dict[str, Any], turn: float | None = None, lead: float = 0.0) -> bool:
        """Take the job out of its worker until a limit lets it run; False if not ours.

        ``turn``: seconds to the turn it reserved (kept in the record); it is sent
        again ``lead`` seconds before it.
        """
        keys = self.keys
        return bool(self._park(
            keys=[keys.job(job_id), keys.lease(job_id), keys.delayed(), keys.delayed_messages(),
                  keys.running(), keys.running_messages()],
            args=[token, job_id, max(int(wait * 1000), 1), reason, _dumps(message),
                  self.queued_ttl,
                  "" if turn is None else int(turn * 1000), int(lead * 1000)]))

    def due(self, limit: int = 500) -> list[tuple[str, dict[str, Any], str]]:
        """Waiting jobs whose wait is over: (job id, message to send, the score it is held
        at until ``sent``)."""
        flat = self._due(keys=[self.keys.delayed(), self.keys.delayed_messages()],
                         args=[limit, _HOLD_MS])
        triples = zip(flat[::3], flat[1::3], flat[2::3], strict=True)
        return [(text(job_id), json.loads(raw), text(held)) for job_id, raw, held in triples]

    def sent(self, job_id: str, held: str, ok: bool = True) -> None:
        """A due job's message went out again (or, if not ``ok``, it is due again soon)."""
        self._sent(keys=[self.keys.delayed(), self.keys.delayed_messages()],
                   args=[job_id, held, "" if ok else _RETRY_MS])

    def finish_command(self, job_id: str, token: str, ttl: int, event: str, event_id: str,
                       result: str | None, fields: list[str]) -> Command:
        """The one atomic write that ends a job, refused unless ``token`` still owns it."""
        keys = self.keys
        return ("EVAL", _FINISH, 7, keys.job(job_id), keys.result(job_id),
                keys.events(job_id), keys.channel(job_id), keys.lease(job_id), keys.running(),
                keys.running_messages(), token, ttl, event, event_id, result or "", job_id, *fields)

    def defer(self, job_id: str, message: dict[str, Any]) -> bool:
        """A delivery found the job held: look again when the holder's lease would lapse.

        False if the lease is already gone (the caller claims again).
        """
        keys = self.keys
        return bool(self._defer(
            keys=[keys.job(job_id), keys.lease(job_id), keys.delayed(), keys.delayed_messages()],
            args=[job_id, _dumps(message), _DEFER_MARGIN_MS, self.queued_ttl]))

    def recover(self, cutoff_ms: int, limit: int = 500) -> list[str]:
        """Send again the jobs orphaned before ``cutoff_ms`` (see ``_RECOVER``); their ids."""
        keys = self.keys
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrangebyscore(keys.running(), "-inf", cutoff_ms, 0, limit)
        for key in (keys.running(), keys.running_messages()):  # they live while jobs run
            pipe.expire(key, self.queued_ttl)
        ids = [text(i) for i in pipe.execute()[0]]
        recovered = []
        for job_id in ids:
            outcome = text(self._recover(
                keys=[keys.running(), keys.job(job_id), keys.lease(job_id), keys.delayed(),
                      keys.delayed_messages(), keys.running_messages()],
                args=[job_id, self.queued_ttl]))
            if outcome == "recovered":
                recovered.append(job_id)
        return recovered

