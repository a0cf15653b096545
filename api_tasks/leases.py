"""Exactly one outcome per job: claims, leases, and the fenced finish.

A worker claims a job before calling the upstream: the claim writes a fresh
attempt token into the job record and takes a lease (a key that expires
unless the worker renews it). Then:

- a second delivery of a job that is running (lease held) or finished is
  dropped without calling the upstream;
- only the attempt whose token is in the record may finish the job, so a
  worker that lost its job to a new attempt can't write a second result;
- a job whose lease expired while its worker's heartbeat is gone is an
  orphan: the reaper (``api_tasks.reaper``) sends it again;
- a job delivered more than ``jobs.max_deliveries`` times is poison.

All of it is Lua, so it holds across any number of processes and machines,
and lease times come from Redis's clock (``TIME``), not the workers'.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import redis

from api_tasks.events import EVENT_FIELD
from api_tasks.keys import Keys
from api_tasks.writer import Command

__all__ = ["Claim", "LeaseStore"]

_NOW_MS = "local t = redis.call('TIME')\nlocal now_ms = t[1] * 1000 + math.floor(t[2] / 1000)\n"

# KEYS: job, cancel, lease, leases. ARGV: now, ttl, token, lease_ms, max_deliveries,
# job id, spec, then field/value pairs for a job nobody recorded (a plain Celery client's).
_CLAIM = _NOW_MS + """
local s = redis.call('HGET', KEYS[1], 'status')
local created = redis.call('HGET', KEYS[1], 'created_at') or ARGV[1]
if s == 'succeeded' or s == 'failed' or s == 'cancelled' then return {s, '0', created} end
if redis.call('EXISTS', KEYS[3]) == 1 then return {'busy', '0', created} end
if not s then redis.call('HSET', KEYS[1], 'created_at', ARGV[1], unpack(ARGV, 8)) end
local n = redis.call('HINCRBY', KEYS[1], 'deliveries', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[1], 'token', ARGV[3],
           'spec', ARGV[7])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[4])
redis.call('ZADD', KEYS[4], now_ms + tonumber(ARGV[4]), ARGV[6])
redis.call('EXPIRE', KEYS[4], ARGV[2])
local verdict = 'run'
if redis.call('EXISTS', KEYS[2]) == 1 then verdict = 'cancel'
elseif n > tonumber(ARGV[5]) then verdict = 'poison' end
return {verdict, tostring(n), created}
"""

# KEYS: job, lease, leases. ARGV: token, lease_ms, job id, ttl. Also re-takes a lease
# that lapsed while Redis was away, as long as the record still names this attempt.
_RENEW = _NOW_MS + """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[3], now_ms + tonumber(ARGV[2]), ARGV[3])
redis.call('EXPIRE', KEYS[3], ARGV[4])
return 1
"""

# KEYS: job, lease, leases. ARGV: token, job id. The worker stops: back to the queue.
_RELEASE = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'status', 'queued')
redis.call('HDEL', KEYS[1], 'token')
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[2])
return 1
"""

# KEYS: job, lease, leases. ARGV: job id, the workers' heartbeat key prefix. An orphan:
# running, lease lapsed, and its worker's heartbeat gone. Returns its task message.
_ORPHAN = """
if redis.call('EXISTS', KEYS[2]) == 1 then return false end
local s = redis.call('HGET', KEYS[1], 'status')
if s ~= 'running' then redis.call('ZREM', KEYS[3], ARGV[1]) return false end
local worker = string.match(redis.call('HGET', KEYS[1], 'token') or '', '^(.*)/[^/]*$')
if worker and redis.call('EXISTS', ARGV[2] .. worker) == 1 then return false end
redis.call('HSET', KEYS[1], 'status', 'queued')
redis.call('HDEL', KEYS[1], 'token')
redis.call('ZREM', KEYS[3], ARGV[1])
return redis.call('HGET', KEYS[1], 'spec') or false
"""

# KEYS: job, result, events, channel, lease, leases. ARGV: token ('' = whoever holds it,
# for the last-resort failure), job id, ttl, event, wanted entry id, result ('' for
# none), then job field/value pairs. A job already ended is never written twice.
_FINISH = """
local s = redis.call('HGET', KEYS[1], 'status')
if s == 'succeeded' or s == 'failed' or s == 'cancelled' then return 'ended' end
if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 'lost' end
redis.call('HSET', KEYS[1], unpack(ARGV, 7))
redis.call('HDEL', KEYS[1], 'token', 'spec')
redis.call('EXPIRE', KEYS[1], ARGV[3])
if ARGV[6] ~= '' then redis.call('SET', KEYS[2], ARGV[6], 'EX', ARGV[3]) end
local id = ARGV[5]
local last = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)[1]
if last then
  local la, ls = string.match(last[1], '(%d+)-(%d+)')
  local wa, ws = string.match(id, '(%d+)-(%d+)')
  la, ls, wa, ws = tonumber(la), tonumber(ls), tonumber(wa), tonumber(ws)
  if wa < la or (wa == la and ws <= ls) then id = la .. '-' .. (ls + 1) end
end
redis.call('XADD', KEYS[3], id, '""" + EVENT_FIELD + """', ARGV[4])
redis.call('EXPIRE', KEYS[3], ARGV[3])
redis.call('PUBLISH', KEYS[4], ARGV[4])
redis.call('DEL', KEYS[5])
redis.call('ZREM', KEYS[6], ARGV[2])
return 'ok'
"""


@dataclass(frozen=True)
class Claim:
    """What a worker learned when it claimed a job."""

    verdict: str  # run | cancel | poison | busy | the final status of a finished job
    delivery: int
    created_at: float


class LeaseStore:
    """The worker side of a job's record: claim, renew, release, finish."""

    def __init__(self, client: redis.Redis, keys: Keys, queued_ttl: int,
                 lease_ms: int, max_deliveries: int) -> None:
        self.redis = client
        self.keys = keys
        self.queued_ttl = queued_ttl
        self.lease_ms = lease_ms
        self.max_deliveries = max_deliveries
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._orphan = client.register_script(_ORPHAN)

    def claim(self, job_id: str, token: str, spec: dict[str, Any],
              fields: dict[str, str], now: float) -> Claim:
        """Take the job for attempt ``token``, unless it is finished or held."""
        keys = self.keys
        flat = [item for pair in fields.items() for item in pair]
        verdict, delivery, created = self._claim(
            keys=[keys.job(job_id), keys.cancel(job_id), keys.lease(job_id), keys.leases()],
            args=[repr(now), self.queued_ttl, token, self.lease_ms, self.max_deliveries,
                  job_id, json.dumps(spec, separators=(",", ":")), *flat])
        return Claim(_text(verdict), int(delivery), float(created))

    def renew(self, held: list[tuple[str, str]]) -> list[str]:
        """Renew the leases of (job id, token) pairs; return the job ids no longer ours."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id, token in held:
            self._renew(keys=[self.keys.job(job_id), self.keys.lease(job_id),
                              self.keys.leases()],
                        args=[token, self.lease_ms, job_id, self.queued_ttl], client=pipe)
        results = pipe.execute()
        return [job_id for (job_id, _), ok in zip(held, results, strict=True) if not ok]

    def release(self, job_id: str, token: str) -> bool:
        """Give a job back (the worker is stopping); True if it was still ours."""
        keys = self.keys
        return bool(self._release(keys=[keys.job(job_id), keys.lease(job_id), keys.leases()],
                                  args=[token, job_id]))

    def heartbeat(self, worker_id: str) -> None:
        """Say this worker process is alive, for one lease period."""
        self.redis.set(self.keys.worker(worker_id), "1", px=self.lease_ms)

    def expired(self, limit: int = 500) -> list[str]:
        """Job ids whose lease expiry has passed, by Redis's clock."""
        seconds, micros = self.redis.time()
        now_ms = seconds * 1000 + micros // 1000
        ids = self.redis.zrangebyscore(self.keys.leases(), "-inf", now_ms, start=0, num=limit)
        return [_text(job_id) for job_id in ids]

    def take_orphan(self, job_id: str) -> dict[str, Any] | None:
        """Mark an orphaned job queued again and return its task message (None if not one)."""
        keys = self.keys
        spec = self._orphan(keys=[keys.job(job_id), keys.lease(job_id), keys.leases()],
                            args=[job_id, keys.worker("")])
        return None if spec is None else dict(json.loads(spec))

    def finish_command(self, job_id: str, token: str, ttl: int, event: str, event_id: str,
                       result: str | None, fields: list[str]) -> Command:
        """The one atomic write that ends a job, refused unless ``token`` still owns it."""
        keys = self.keys
        return ("EVAL", _FINISH, 6, keys.job(job_id), keys.result(job_id),
                keys.events(job_id), keys.channel(job_id), keys.lease(job_id), keys.leases(),
                token, job_id, ttl, event, event_id, result or "", *fields)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
