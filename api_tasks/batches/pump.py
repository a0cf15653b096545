"""The workers' side of detached batches: record what ended, send what's next, close.

Every worker runs a pump thread; a few times a second it steps each active
batch that no other worker is stepping (a lock per batch in Redis). A step:

1. records each ended job's line in the output or error list: one Lua script
   per line that first removes the job from the batch's outstanding hash, so a
   line is recorded once whatever crashes and whoever steps next;
2. looks after the jobs not ended: a line taken but not marked sent (its
   stepper died between the two) is sent again; its job id is
   ``<batch id>-<line index>``, so if it had gone out after all, the second
   message is a duplicate the workers drop, not a second call. A job marked
   sent whose record is gone is recorded as failed, never sent again;
3. in a cancelling batch, cancels the queued jobs (running ones finish);
4. in a running batch, takes new lines up to the window and sends them;
5. in a cancelled batch with nothing outstanding, records the lines never
   sent as cancelled (a chunk a step), so every line ends in one file;
6. closes the batch when every line has been recorded: the input is dropped,
   the rest expires after ``jobs.result_ttl``.

The outstanding hash maps a job id to ``u:<custom_id>`` (taken, not yet sent)
or ``s:<custom_id>`` (sent).
"""

from __future__ import annotations

import functools
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis

from api_tasks import metrics
from api_tasks.background import Sweep, each
from api_tasks.batches.api_batches import batch_event, output_file_ids
from api_tasks.batches.files import INDEX_TTL, FileRecords
from api_tasks.batches.inputs import PieceCache, read_lines
from api_tasks.batches.lines import line_params, record_for, usage_of
from api_tasks.batches.state import BatchStatus
from api_tasks.batches.validation import Checked, check_input
from api_tasks.connections import UNAVAILABLE, text, text_map
from api_tasks.errors import InvalidJob, error_object
from api_tasks.record.calls import Call, lua
from api_tasks.record.job_record import TERMINAL, Field, JobStatus
from api_tasks.record.scripts import script

if TYPE_CHECKING:
    from api_tasks.enqueue import Enqueuer

__all__ = ["BatchPump"]

log = logging.getLogger(__name__)

_TAKE = script("batch_take")
_MARK = script("batch_mark")
_DRAIN = script("batch_drain")
_CLOSE = script("batch_close")
_RELEASE = script("unlock")
_VALIDATED = script("batch_validated")
_INVALID = script("batch_invalid")
_FINALIZE = script("batch_finalize")
_EXPIRE = script("batch_expire")
_STAGED_TTL = 3600  # a validation's staged marks, if its worker dies
_FILE_MARGIN = 3600  # seconds an input file's bytes outlast its batch's window

_EVERY = 0.2  # seconds between two passes over the active batches while they move
_QUIET = 2.0  # the longest between two, as passes that move nothing space out (doubling)
_HELPER = 5.0  # seconds between two passes of a worker that does not sweep: it steps what
# the sweeper is not stepping, should it be slow on one batch
_LOCK_MS = 10_000  # longer than a step; a stepper that dies holds its batch this long (the
# scripts keep two steppers at once safe, this only keeps them from doing the work twice)
_TAKE_AT_MOST = 500  # lines sent in one step
_LOOK_EVERY = 5.0  # seconds between two looks for a batch's long-queued jobs
_COUNTERS = {JobStatus.SUCCEEDED.value: "completed", JobStatus.CANCELLED.value: "cancelled"}

_INPUT_MISSING = error_object("server_error", "input_missing", "the batch's input is gone")
_EXPIRED = error_object("batch_expired", "batch_expired", "This request could not be executed "
                        "before the completion window expired.")


class BatchPump(Sweep):
    """A thread that moves every active batch forward, a few times a second."""

    def __init__(self, client: Enqueuer, waits: redis.Redis,
                 sweeping: Callable[[], bool] = lambda: True) -> None:
        super().__init__("api-tasks-batches", waits, client.keys.batches_wake(),
                         client.settings.jobs.queued_ttl, sweeping, _HELPER, log)
        self._client = client
        self._redis = client.redis
        self._keys = client.keys
        self._ttl = client.settings.jobs.queued_ttl
        self._token = uuid.uuid4().hex
        self._scripts = {name: self._redis.register_script(source) for name, source in
                         (("take", _TAKE), ("mark", _MARK), ("drain", _DRAIN),
                          ("close", _CLOSE), ("release", _RELEASE),
                          ("validated", _VALIDATED), ("invalid", _INVALID),
                          ("finalize", _FINALIZE), ("expire", _EXPIRE))}
        self._looked: dict[str, float] = {}
        self._quiet = _EVERY  # seconds to the next pass while nothing moves
        self._shell = client.store.shell
        self._pieces = PieceCache()  # input files' pieces this pump read last

    def sweep(self) -> float | None:
        """One pass over the active batches: a few times a second while they move, in the
        process that sweeps for the cluster (every few seconds in the others), less often
        while they wait for their jobs; none active, it waits for one to start."""
        active, moved = self.run_once()
        self._quiet = _EVERY if moved else min(self._quiet * 2, _QUIET)
        return self._quiet if active else None

    def run_once(self) -> tuple[int, int]:
        """Step every active batch no other worker is stepping; how many are active, and how
        many this pass moved (a line recorded or sent, a state changed)."""
        found, unlisted = each(self.shards(self._keys.every_shard), self._active)
        ids = [batch_id for listed in found for batch_id in listed]
        moved, unstepped = each(ids, self._step_locked)
        if (failed := unlisted or unstepped) is not None:  # the others were stepped
            raise failed
        return len(ids), sum(moved)

    def _active(self, shard: int) -> list[str]:
        """The ids of a shard's active batches (its list kept while it has some)."""
        active = self._keys.batches(shard)
        if found := [text(i) for i in self._redis.smembers(active)]:
            self._redis.expire(active, self._ttl)
        return found

    def _step_locked(self, batch_id: str) -> bool:
        lock = self._keys.batch_lock(batch_id)
        if not self._redis.set(lock, self._token, nx=True, px=_LOCK_MS):
            return False
        try:
            return self.step(batch_id)
        except UNAVAILABLE:
            raise
        except Exception:  # one bad batch must not stop the others
            log.exception("batch %s: step failed", batch_id)
            return False
        finally:
            self._scripts["release"](keys=[lock], args=[self._token])

    def step(self, batch_id: str) -> bool:
        """Record, look after, cancel, send and close, once, for one batch (or check its
        input, or make its output files, for a batch made through the Batches API); whether
        it moved."""
        state = text_map(self._redis.hgetall(self._keys.batch(batch_id)))
        if state.get("status") == BatchStatus.VALIDATING:
            self._validate(batch_id, state)
            return True
        if state.get("status") == BatchStatus.FINALIZING:
            self._finalize(batch_id, state)
            return True
        moved = False
        if self._past_window(state) and self._scripts["expire"](
                keys=[self._keys.batch(batch_id)], args=[repr(time.time())]):
            log.info("batch %s: past its completion window; expiring", batch_id)
            state.update(status=BatchStatus.CANCELLING.value, expiring="1")
            moved = True
        jobs = text_map(self._redis.hgetall(self._keys.batch_jobs(batch_id)))
        store = self._client.store
        statuses = dict(zip(jobs, store.statuses(list(jobs)), strict=True))
        ended = [job_id for job_id, status in statuses.items() if status in TERMINAL]
        records = []
        for job_id, stored in store.results(ended).items():
            if state.get("expiring") and (stored or {}).get("status") == \
                    JobStatus.CANCELLED.value:  # cancelled by the batch's expiry
                stored = {**(stored or {}), "error": _EXPIRED}
            records.append(self._record(batch_id, job_id, jobs.pop(job_id)[2:], stored))
        self._shell.run_all(records)  # one round trip; each script records its line once
        moved = moved or bool(records)
        for job_id, mark in jobs.items():
            self._look_after(batch_id, state, job_id, mark, statuses[job_id])
        if state.get("status") == BatchStatus.IN_PROGRESS and self._due_for_a_look(batch_id):
            self._send_again(batch_id, state, {job_id: mark[2:] for job_id, mark in jobs.items()
                                               if mark.startswith("s:")
                                               and statuses[job_id] == JobStatus.QUEUED})
        sent = state.get("status") == BatchStatus.IN_PROGRESS and self._send_more(batch_id, state,
                                                                         len(jobs))
        if state.get("status") == BatchStatus.CANCELLING and not jobs:
            sent = self._cancel_unsent(batch_id, state)
        if not jobs and not sent:  # nothing outstanding: perhaps the batch is done
            closed = self._scripts["close"](keys=[*self._all_keys(batch_id),
                                                  self._keys.batches(self._keys.shard(batch_id))],
                                            args=[batch_id, repr(time.time()),
                                                  self._client.settings.jobs.result_ttl])
            if closed == 2:  # made through the Batches API: its files, now (the close
                # wrote how it ends: completed, cancelled or expired)
                self._finalize(batch_id, {**state, "ending": text(self._redis.hget(
                    self._keys.batch(batch_id), "ending") or b"completed")})
            moved = moved or bool(closed)
        return moved or bool(sent)

    @staticmethod
    def _past_window(state: dict[str, str]) -> bool:
        """A running API batch whose completion window has passed."""
        return state.get("status") == BatchStatus.IN_PROGRESS and bool(
            state.get("expires_at")) and time.time() >= float(state["expires_at"])

    def _validate(self, batch_id: str, state: dict[str, str]) -> None:
        """Check a new API batch's input file: start it on the good lines, or fail it."""
        settings, keys = self._client.settings, self._keys
        staged = keys.batch_staged(batch_id, uuid.uuid4().hex)
        shell, files = self._shell, FileRecords(keys)
        file_id = state.get("input_file_id", "")
        meta = shell.run(files.meta(file_id))
        if meta.get("owner") != state.get("owner"):
            checked = Checked()
            checked.refuse("file_missing", f"the input file {file_id} is gone (deleted, or "
                           "expired)", param="input_file_id")
        else:
            checked = check_input(shell, files, file_id, int(meta.get("bytes") or 0),
                                  state.get("endpoint", ""), staged,
                                  _STAGED_TTL, settings.files.max_lines,
                                  settings.jobs.max_request_bytes)
        now = repr(time.time())
        if checked.found:
            log.info("batch %s: its input file has %d problem(s); failed", batch_id,
                     checked.found)
            hooks = batch_event(keys, settings, state.get("owner", ""), "batch.failed",
                                batch_id)
            if self._scripts["invalid"](keys=[keys.batch(batch_id), staged,
                                              keys.batches(keys.shard(batch_id)), *hooks.keys],
                                        args=[batch_id, now, json.dumps(checked.problems),
                                              int(state.get("output_ttl") or self._ttl),
                                              *hooks.args]):
                shell.follow(hooks.after)
            return
        # its file's bytes must outlast its window, and its finalizing after that (kept
        # first, apart from the batch's script: the file lives on another slot on a cluster)
        keep = int(float(state.get("expires_at") or time.time()) - time.time()) + _FILE_MARGIN
        shell.run(lua("keep_at_least", [keys.file_data(file_id)], [max(keep, _FILE_MARGIN)]))
        self._scripts["validated"](keys=[keys.batch(batch_id), staged,
                                         keys.batch_input(batch_id)],
                                   args=[checked.total, self._ttl, now, checked.model])

    def _finalize(self, batch_id: str, state: dict[str, str]) -> None:
        """Make a finished API batch's output and error files, and end it."""
        keys = self._keys
        output, errors = output_file_ids(batch_id)
        sizes = [self._list_bytes(keys.batch_output(batch_id)),
                 self._list_bytes(keys.batch_errors(batch_id))]
        hooks = batch_event(keys, self._client.settings, state["owner"],
                            f"batch.{state.get('ending', 'completed')}", batch_id)
        # the files go into their owner's index after (on another slot on a Redis Cluster)
        after: list[Call[Any]] = [
            lua("owner_index", [keys.owned_files(state["owner"])], [file_id, INDEX_TTL])
            for file_id, size in zip((output, errors), sizes, strict=True) if size]
        if self._scripts["finalize"](
                keys=[keys.batch(batch_id), keys.batch_output(batch_id),
                      keys.batch_errors(batch_id), keys.file(output), keys.file(errors),
                      keys.batches(keys.shard(batch_id)), *hooks.keys],
                args=[batch_id, repr(time.time()), *sizes, output, errors,
                      int(state.get("output_ttl") or self._ttl), *hooks.args]):
            self._shell.follow(after + hooks.after)

    def _list_bytes(self, key: str) -> int:
        """The size of a list's entries as a JSONL file (one newline each)."""
        size, start = 0, 0
        while chunk := self._redis.lrange(key, start, start + 999):
            size += sum(len(entry) + 1 for entry in chunk)
            start += len(chunk)
        return size

    def _all_keys(self, batch_id: str) -> list[str]:
        keys = self._keys
        return [keys.batch(batch_id), keys.batch_jobs(batch_id), keys.batch_input(batch_id),
                keys.batch_output(batch_id), keys.batch_errors(batch_id)]

    def _write(self, batch_id: str, job_id: str, custom_id: str,
               stored: dict[str, Any] | None) -> None:
        self._shell.run(self._record(batch_id, job_id, custom_id, stored))

    def _record(self, batch_id: str, job_id: str, custom_id: str,
                stored: dict[str, Any] | None) -> Call[Any]:
        """The call that records an ended line in the output or error list, once."""
        _ok, record = record_for(job_id, custom_id, stored)
        counter = _COUNTERS.get((stored or {}).get("status", ""), "failed")
        usage = [item for pair in usage_of(stored).items() for item in pair]
        return lua("batch_record", [*self._all_keys(batch_id), self._keys.result(job_id),
                                    self._keys.events(job_id), self._keys.job(job_id)],
                   [job_id, counter, json.dumps(record, separators=(",", ":")), self._ttl,
                    *usage], parse=functools.partial(_counted, counter))

    def _look_after(self, batch_id: str, state: dict[str, str], job_id: str, mark: str,
                    status: str | None) -> None:
        """A job not ended: send it (again), give it up, or cancel it."""
        cancelling, sent = state.get("status") == BatchStatus.CANCELLING, mark.startswith("s:")
        if sent and status is None:  # expired or deleted: sending it again could call twice
            self._write(batch_id, job_id, mark[2:], None)
        elif cancelling and status in (None, "queued", "waiting"):
            if status is None:  # perhaps sent, not yet claimed: a record ends it here
                self._client.store.create(job_id, {Field.BATCH: batch_id})
            self._client.store.cancel(job_id, queued_only=True)
        elif not sent and not cancelling:
            log.warning("batch %s: job %s was taken but not sent; sending it", batch_id, job_id)
            self._resend(batch_id, state, job_id, mark[2:], sent=False)

    def _due_for_a_look(self, batch_id: str) -> bool:
        """At most every few seconds per batch: long-queued jobs are rare, lookups are not."""
        now = time.monotonic()
        if now - self._looked.get(batch_id, 0.0) < _LOOK_EVERY:
            return False
        if len(self._looked) > 10_000:  # forget batches long closed
            self._looked.clear()
        self._looked[batch_id] = now
        return True

    def _send_again(self, batch_id: str, state: dict[str, str], queued: dict[str, str]) -> None:
        """Send again the messages of jobs queued for long: one may have been lost.

        kombu pops a message before it records it as unacked, so a worker killed in
        between loses it. A duplicate of a message that was not lost is dropped by the
        claim; the wait doubles after each resend, so a long queue gets few of them.
        """
        pipe = self._redis.pipeline(transaction=False)
        for job_id in queued:
            pipe.hmget(self._keys.job(job_id), Field.CREATED_AT, Field.RESENT_AT, Field.RESENDS)
        after, now = self._client.settings.jobs.batch_resend_after, time.time()
        for (job_id, custom_id), (created, resent, resends) in zip(queued.items(), pipe.execute(),
                                                                   strict=True):
            since = max(float(created or now), float(resent or 0))
            if now - since < after * 2 ** int(resends or 0):
                continue
            log.warning("batch %s: job %s still queued after %.0fs; sending its message again",
                        batch_id, job_id, now - since)
            self._redis.hset(self._keys.job(job_id), mapping={Field.RESENT_AT: repr(now)})
            self._redis.hincrby(self._keys.job(job_id), Field.RESENDS, 1)
            self._resend(batch_id, state, job_id, custom_id, sent=True)

    def _resend(self, batch_id: str, state: dict[str, str], job_id: str, custom_id: str, *,
                sent: bool) -> None:
        """Send a line's job again: one taken but not sent, or (``sent``) one whose message
        may be lost."""
        index = int(job_id.rsplit("-", 1)[1])
        lines = read_lines(self._shell, self._keys, batch_id, state, index, 1, self._pieces)
        if not lines and sent:  # its input is gone, but its message may yet run: left be
            log.warning("batch %s: job %s cannot be sent again: its input is gone", batch_id,
                        job_id)
        elif not lines:
            self._write(batch_id, job_id, custom_id,
                        {"status": JobStatus.FAILED.value, "error": _INPUT_MISSING})
        elif self._send_all(batch_id, {job_id: lines[0]}, state.get("queue", "bulk")):
            self._scripts["mark"](keys=[self._keys.batch_jobs(batch_id)], args=[job_id])

    def _send_more(self, batch_id: str, state: dict[str, str], outstanding: int) -> bool:
        """Take and send lines up to the window; whether any were taken."""
        sent, total = int(state.get("sent", 0)), int(state.get("total", 0))
        room = min(int(state.get("window", 1)) - outstanding, total - sent, _TAKE_AT_MOST)
        if room <= 0:
            return False
        lines = read_lines(self._shell, self._keys, batch_id, state, sent, room, self._pieces)
        if not lines:  # its input is gone (its file deleted): what is left cannot run
            self._drain(batch_id, state, sent, total, "failed")
            return True
        taken = {f"{batch_id}-{sent + i}": line for i, line in enumerate(lines)}
        pairs = [item for job_id, request in taken.items()
                 for item in (job_id, request["custom_id"])]
        keys = self._all_keys(batch_id)[:3]
        if not pairs or not self._scripts["take"](keys=keys, args=[str(sent), self._ttl, *pairs]):
            return False
        done = self._send_all(batch_id, taken, state.get("queue", "bulk"))
        if done:  # the rest stay taken, not sent: the next step sends them again
            self._scripts["mark"](keys=[keys[1]], args=done)
        return True

    def _send_all(self, batch_id: str, taken: dict[str, dict[str, Any]],
                  queue: str) -> list[str]:
        """Send taken lines in one round trip; the job ids done with (sent, or refused and
        recorded failed)."""
        built, done, records = [], [], []
        for job_id, request in taken.items():
            first, params = line_params(request["kind"], request["body"], queue)
            try:
                built.append(self._client.submissions.build(
                    request["kind"], first, params, job_id=job_id,
                    fields={Field.BATCH: batch_id}))
            except InvalidJob as err:  # checked at submit, refused here (the routes differ)
                records.append(self._record(batch_id, job_id, request["custom_id"], {
                    "status": JobStatus.FAILED.value, "error": err.to_error()}))
                done.append(job_id)
        for submission, error in zip(built, self._client.send_all(built), strict=True):
            if error is None:
                done.append(submission.job_id)
            else:  # Redis away, or full: the job stays taken, not sent
                log.warning("batch %s: could not send job %s (%s)", batch_id,
                            submission.job_id, error)
        self._shell.run_all(records)
        return done

    def _cancel_unsent(self, batch_id: str, state: dict[str, str]) -> bool:
        """Record lines a cancelled batch never sent as cancelled, a chunk a step; whether
        any were left."""
        sent, total = int(state.get("sent", 0)), int(state.get("total", 0))
        if sent >= total:
            return False
        self._drain(batch_id, state, sent, total, "cancelled")
        return True

    def _drain(self, batch_id: str, state: dict[str, str], sent: int, total: int,
               counter: str) -> None:
        """Record a chunk of the lines never sent in the error file: as cancelled, or as
        failed once the input is gone."""
        count = min(_TAKE_AT_MOST, total - sent)
        lines = read_lines(self._shell, self._keys, batch_id, state, sent, count,
                           self._pieces) if counter == "cancelled" else []
        error = _EXPIRED if state.get("expiring") else error_object(
            "cancelled", "cancelled", "the batch was cancelled before this line was sent")
        records = [json.dumps(record_for(f"{batch_id}-{sent + i}", line["custom_id"],
                                         {"status": JobStatus.CANCELLED.value,
                                          "error": error})[1], separators=(",", ":"))
                   for i, line in enumerate(lines)]
        if not records and count:  # the input is gone: the lines left fail (when some were
            # read, they are recorded now and the rest in a later step)
            counter = "failed"
            records = [json.dumps(record_for(f"{batch_id}-{index}", "", {
                "status": JobStatus.FAILED.value, "error": _INPUT_MISSING})[1])
                for index in range(sent, sent + count)]
        drained = self._scripts["drain"](keys=[self._keys.batch(batch_id),
                                               self._keys.batch_errors(batch_id)],
                                         args=[str(sent), self._ttl, counter, *records])
        if drained == 1 and records:
            metrics.BATCH_LINES.labels(counter).inc(len(records))


def _counted(outcome: str, recorded: Any) -> Any:
    """A line the script recorded (not one recorded before) counts in the metrics."""
    if recorded == 1:
        metrics.BATCH_LINES.labels(outcome).inc()
    return recorded
