"""The workers' side of detached batches: record what ended, send what's next, close.

One worker at a time (a lock in Redis) steps every active batch a few times a
second. A step:

1. records each ended job's line in the output or error list: one Lua script
   per line that first removes the job from the batch's outstanding set, so a
   line is recorded once whatever crashes and whoever steps next;
2. sends again a job whose record is missing (a stepper died between taking
   the line and sending it): its id is ``<batch id>-<line index>``, so a line
   sent twice is a duplicate the workers drop, not a second call;
3. in a cancelling batch, cancels the queued jobs (running ones finish);
4. in a running batch, takes new lines up to the window and sends them;
5. closes the batch when every line has been recorded (or, cancelled, when
   nothing is outstanding): the input is dropped, the rest expires after
   ``jobs.result_ttl``.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

import redis

from api_tasks.batch import ended_jobs, line_params, record_for, usage_of
from api_tasks.connections import text
from api_tasks.errors import BrokerUnavailable, InvalidJob
from api_tasks.events import JobStatus

if TYPE_CHECKING:
    from api_tasks.client import Client

__all__ = ["BatchPump"]

log = logging.getLogger(__name__)

# KEYS: batch, jobs, input. ARGV: the sent count read, ttl, then job id / custom_id
# pairs. Takes the lines only if no other stepper took them meanwhile.
_TAKE = """
if redis.call('HGET', KEYS[1], 'status') ~= 'in_progress' then return 0 end
if redis.call('HGET', KEYS[1], 'sent') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], unpack(ARGV, 3))
redis.call('HINCRBY', KEYS[1], 'sent', (#ARGV - 2) / 2)
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[2]) end
return 1
"""

# KEYS: batch, jobs, output, errors. ARGV: job id, counter, record, ttl, then usage
# name/count pairs.
_RECORD = """
if redis.call('HDEL', KEYS[2], ARGV[1]) == 0 then return 0 end
local list = KEYS[4]
if ARGV[2] == 'completed' then list = KEYS[3] end
redis.call('RPUSH', list, ARGV[3])
redis.call('EXPIRE', list, ARGV[4])
redis.call('HINCRBY', KEYS[1], ARGV[2], 1)
for i = 5, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], 'usage.' .. ARGV[i], ARGV[i + 1]) end
return 1
"""

# KEYS: batch, jobs, input, output, errors, active batches. ARGV: batch id, now, ttl.
_CLOSE = """
local s = redis.call('HGET', KEYS[1], 'status')
if s ~= 'in_progress' and s ~= 'cancelling' then
  redis.call('SREM', KEYS[6], ARGV[1])
  return 0
end
if redis.call('HLEN', KEYS[2]) > 0 then return 0 end
local counts = redis.call('HMGET', KEYS[1], 'sent', 'total')
if s == 'in_progress' and tonumber(counts[1]) < tonumber(counts[2]) then return 0 end
redis.call('HSET', KEYS[1], 'status', s == 'in_progress' and 'completed' or 'cancelled',
           'finished_at', ARGV[2])
redis.call('DEL', KEYS[3])
redis.call('SREM', KEYS[6], ARGV[1])
for i = 1, 5 do redis.call('EXPIRE', KEYS[i], ARGV[3]) end
return 1
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_LOCK_MS = 30_000  # far longer than a step; a stepper that dies leaves it for this long
_COUNTERS = {JobStatus.SUCCEEDED.value: "completed", JobStatus.CANCELLED.value: "cancelled"}


class BatchPump:
    """Moves every active batch forward; ``run_once`` is called a few times a second."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._redis = client.redis
        self._keys = client.keys
        self._token = uuid.uuid4().hex
        self._take = self._redis.register_script(_TAKE)
        self._record = self._redis.register_script(_RECORD)
        self._close = self._redis.register_script(_CLOSE)
        self._release = self._redis.register_script(_RELEASE)

    def run_once(self) -> int:
        """Step every active batch, if no other worker is; returns how many were stepped."""
        lock = self._keys.batch_lock()
        if not self._redis.set(lock, self._token, nx=True, px=_LOCK_MS):
            return 0
        try:
            ids = [text(i) for i in self._redis.smembers(self._keys.batches())]
            for batch_id in ids:
                try:
                    self.step(batch_id)
                except redis.ConnectionError:
                    raise
                except Exception:  # one bad batch must not stop the others
                    log.exception("batch %s: step failed", batch_id)
            return len(ids)
        finally:
            self._release(keys=[lock], args=[self._token])

    def step(self, batch_id: str) -> None:
        """Record, recover, cancel, send and close, once, for one batch."""
        state = {text(k): text(v) for k, v in
                 self._redis.hgetall(self._keys.batch(batch_id)).items()}
        jobs = {text(k): text(v) for k, v in
                self._redis.hgetall(self._keys.batch_jobs(batch_id)).items()}
        ended = ended_jobs(self._redis, self._keys, list(jobs))
        for job_id, stored in ended.items():
            self._write(batch_id, job_id, jobs.pop(job_id), stored)
        status = state.get("status")
        if jobs:
            self._look_after(batch_id, state, jobs)
        if status == "in_progress":
            self._send_more(batch_id, state, len(jobs))
        self._close(keys=[*self._all_keys(batch_id), self._keys.batches()],
                    args=[batch_id, repr(time.time()), self._client.settings.jobs.result_ttl])

    def _all_keys(self, batch_id: str) -> list[str]:
        keys = self._keys
        return [keys.batch(batch_id), keys.batch_jobs(batch_id), keys.batch_input(batch_id),
                keys.batch_output(batch_id), keys.batch_errors(batch_id)]

    def _write(self, batch_id: str, job_id: str, custom_id: str,
               stored: dict[str, Any] | None) -> None:
        _ok, record = record_for(job_id, custom_id, stored)
        counter = _COUNTERS.get((stored or {}).get("status", ""), "failed")
        usage = [item for pair in usage_of(stored).items() for item in pair]
        keys = self._all_keys(batch_id)
        self._record(keys=[keys[0], keys[1], keys[3], keys[4]],
                     args=[job_id, counter, json.dumps(record, separators=(",", ":")),
                           self._client.settings.jobs.queued_ttl, *usage])

    def _look_after(self, batch_id: str, state: dict[str, str], jobs: dict[str, str]) -> None:
        """Jobs not ended: send again the lost ones; in a cancelling batch, cancel."""
        status = state.get("status")
        pipe = self._redis.pipeline(transaction=False)
        for job_id in jobs:
            pipe.hget(self._keys.job(job_id), "status")
        for job_id, raw in zip(list(jobs), pipe.execute(), strict=True):
            if status == "cancelling":
                if raw is None:  # never sent, or sent and not yet claimed: end it here
                    self._client.store.create(job_id, {"batch": batch_id})
                self._client.store.cancel(job_id, queued_only=True)
            elif raw is None:
                log.warning("batch %s: job %s was never sent; sending it", batch_id, job_id)
                index = int(job_id.rsplit("-", 1)[1])
                line = self._redis.lindex(self._keys.batch_input(batch_id), index)
                if line is not None:
                    self._send(batch_id, job_id, text(line), state.get("queue", "bulk"))

    def _send_more(self, batch_id: str, state: dict[str, str], outstanding: int) -> None:
        sent, total = int(state.get("sent", 0)), int(state.get("total", 0))
        room = min(int(state.get("window", 1)) - outstanding, total - sent)
        if room <= 0:
            return
        lines = [text(raw) for raw in self._redis.lrange(
            self._keys.batch_input(batch_id), sent, sent + room - 1)]
        taken = {f"{batch_id}-{sent + i}": line for i, line in enumerate(lines)}
        pairs = [item for job_id, line in taken.items()
                 for item in (job_id, json.loads(line)["custom_id"])]
        keys = self._all_keys(batch_id)[:3]
        ttl = self._client.settings.jobs.queued_ttl
        if not pairs or not self._take(keys=keys, args=[state.get("sent", "0"), ttl, *pairs]):
            return
        for job_id, line in taken.items():
            if not self._send(batch_id, job_id, line, state.get("queue", "bulk")):
                return  # Redis went away: the next step sends the rest again

    def _send(self, batch_id: str, job_id: str, line: str, queue: str) -> bool:
        request = json.loads(line)
        first, params = line_params(request["kind"], request["body"], queue)
        try:
            self._client.submit(request["kind"], first, params, job_id=job_id,
                                fields={"batch": batch_id})
        except InvalidJob as err:  # checked at submit, refused here (the routes differ)
            stored = {"status": JobStatus.FAILED.value, "error": err.to_error()}
            self._write(batch_id, job_id, request["custom_id"], stored)
        except BrokerUnavailable as err:
            log.warning("batch %s: could not send job %s (%s)", batch_id, job_id, err)
            return False
        return True
