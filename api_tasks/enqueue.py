"""Putting a job on the queue: validate, record, send. What producers and workers share.

A submit is one Redis round trip: the job's record and its task message
(``broker.task_message``) in one script, or, for a job with an owner's index entry to add, a
transaction of the three; built here as calls (``Submissions``) and run by the sync
``Enqueuer`` (producers, the workers' batch pump) or the gateway's ``AsyncEnqueuer``. With the
state on a Redis apart from the broker (``redis.state_url``), it is two: the record's
transaction, then the message; a message the broker refused takes its record back out.
``Client`` (the producer API) is an ``Enqueuer`` that also hands back ``Job``s.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import redis
import redis.asyncio
from redis.exceptions import RedisClusterException

from api_tasks import metrics, tracing
from api_tasks.broker import task_message
from api_tasks.connections import UNAVAILABLE, connect, reason
from api_tasks.errors import BrokerUnavailable
from api_tasks.record.calls import AsyncShell, Call, Failed, SyncShell, lua
from api_tasks.record.job_record import queued, submit_fields
from api_tasks.record.keys import Keys
from api_tasks.record.store import AsyncJobStore, JobRecords, JobStore
from api_tasks.record.webhooks import job_notifier
from api_tasks.spec import Kind, build_spec
from api_tasks.upstream.routing import resolve_upstream

if TYPE_CHECKING:
    from config.settings import Settings

__all__ = ["PRODUCER_POOL", "AsyncEnqueuer", "Enqueuer", "Submission", "Submissions"]

_QUICK_TIMEOUT = 5.0
PRODUCER_POOL = 10_000  # a producer's pools: readers waiting on streams each hold one
_SCRIPTS = ("job_create", "owner_index", "job_send", "job_forget")  # what a submit may run
_BATCH = 200  # submits one gateway round trip carries at most


@dataclass(frozen=True, slots=True)
class Submission:
    """A job ready to send: its id, its record, and the calls that send it."""

    job_id: str
    record: dict[str, str]
    calls: tuple[Call[Any], ...]  # the record's, on the state's Redis
    send: Call[Any] | None  # the task message's, on the broker's (after the record: no worker
    # finds a message without its record); None: the record's script sends it too
    index: Call[Any] | None = None  # its owner's index of jobs, written after the record
    # (on another slot on a Redis Cluster; a listing meeting an id before its record would
    # drop it): a job it misses is still found by its id


class Submissions:
    """Validates jobs and builds their submissions (no I/O)."""

    def __init__(self, settings: Settings, records: JobRecords) -> None:
        self.settings = settings
        self.records = records

    def build(self, kind: Kind, first: Any, params: Mapping[str, Any], *,
              job_id: str | None = None, fields: Mapping[str, str] | None = None) -> Submission:
        """Validate a job (``InvalidJob`` names a bad field) and build its submission."""
        spec = build_spec(kind, first, params, self.settings.jobs.max_request_bytes)
        upstream = resolve_upstream(self.settings, spec)
        lane = spec.queue or self.settings.jobs.default_queue
        job_id = job_id or str(uuid.uuid4())
        record = queued({**submit_fields(spec, upstream.name, lane), **(fields or {})})
        message = task_message(spec.endpoint.task, [first], spec.task_kwargs(), job_id, lane,
                               tracing.submit_headers(job_id, spec.kind, spec.model, lane))
        queue = self.records.keys.queue(lane)
        index = self.records.index(job_id, record)
        if not self.settings.redis.split:  # one script does it all
            return Submission(job_id, record,
                              (self.records.create(job_id, record, (queue, message)),), None,
                              index)
        return Submission(job_id, record, (self.records.create(job_id, record),),
                          lua("job_send", [queue], [message]), index)


def _together(submissions: list[Submission]) -> list[list[Call[Any]]]:
    """Each submission's calls as one group (broker and state as one: its one script writes
    the record and sends the message, so no transaction is needed), then its owner index."""
    return [[*s.calls] for s in submissions] + [[call] for call in _indexes(submissions)]


def _indexes(submissions: list[Submission], written: list[int] | None = None
             ) -> list[Call[Any]]:
    """The owner index calls of the submissions (of those ``written``, when given): run
    after the records, their replies are not looked at."""
    chosen = submissions if written is None else [submissions[i] for i in written]
    return [s.index for s in chosen if s.index is not None]


def _sends(submissions: list[Submission], written: list[int]) -> list[list[Call[Any]]]:
    """The message calls of the submissions whose record was written (broker apart)."""
    return [[send] for i in written if (send := submissions[i].send) is not None]


def _joined(records: list[list[Any] | Failed], sent: list[list[Any] | Failed]
            ) -> list[list[Any] | Failed]:
    """Each submission's replies, its record's then its message's, as one group's would be
    (``sent``: those of the submissions whose record was written, in order); a record that
    failed has its error for its message's reply: its message was not sent."""
    out: list[list[Any] | Failed] = []
    messages = iter(sent)
    for written in records:
        if isinstance(written, Failed):
            out.append(Failed(written.error, [*written.replies, written.error]))
            continue
        message = next(messages)
        out.append(Failed(message.error, [*written, *message.replies])
                   if isinstance(message, Failed) else [*written, *message])
    return out


def _unknown(err: Exception) -> Failed:
    """A message whose send failed on the way: it may have gone (a lost reply), so its record
    stays (a message without its record would run with a bare one); the caller is told the
    submit failed, as after a single Redis's lost reply. A record with no message lapses."""
    return Failed(err, [None])


def _whole(shell: SyncShell | AsyncShell, submissions: list[Submission]) -> bool:
    """Whether several records (broker apart) go in one transaction, so that a failed round
    trip wrote all or none. Not on a Redis Cluster, where a transaction keeps to one slot:
    there each record's one script is whole, and one whose message was not sent lapses."""
    return len(submissions) > 1 and not shell.cluster


def _written(records: list[list[Any] | Failed]) -> list[int]:
    return [i for i, written in enumerate(records) if not isinstance(written, Failed)]


def _outcome(outcome: list[Any] | Failed) -> tuple[Exception | None, bool]:
    """What one submission's send came to: its error (None: sent), and whether its record must
    go (this send created it and its message did not go out: an error reply in the
    transaction, or Redis lacking a script it could not load)."""
    if not isinstance(outcome, Failed):
        return None, False
    created, sent = outcome.replies[0], outcome.replies[-1]
    return _seen(outcome.error), created in (1, True) and isinstance(sent, Exception)


def _created(outcome: Any) -> bool:
    """Whether a send created its job's record (not a job sent again under its id)."""
    return isinstance(outcome, list) and bool(outcome) and outcome[0] in (1, True)


def _seen(err: Exception) -> Exception:
    """The error a submitter sees: ``BrokerUnavailable`` for a Redis out of reach."""
    if isinstance(err, UNAVAILABLE):
        return BrokerUnavailable(f"Redis is unavailable, job not submitted: {err}")
    return err


class Enqueuer:
    """Validates, records and sends jobs, under one Redis pool."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # quick calls fail fast on a hung Redis (redis-py 8 caps a pool at 100 by default)
        self.redis = connect(settings.redis.state(), socket_timeout=_QUICK_TIMEOUT,
                             max_connections=PRODUCER_POOL)
        self.keys = Keys.of(settings)
        self.store = JobStore(self.redis, self.keys, settings.jobs.result_ttl,
                              settings.jobs.queued_ttl,
                              notifier=job_notifier(self.keys, settings))
        self.submissions = Submissions(settings, self.store.records)
        self.apart = settings.redis.split  # the broker on a Redis of its own
        self._broker = SyncShell(connect(settings.redis, socket_timeout=_QUICK_TIMEOUT,
                                         max_connections=PRODUCER_POOL)) if self.apart else None

    @property
    def broker(self) -> SyncShell:
        """The shell on the broker's Redis, for the task messages (the state's own, unless
        apart)."""
        return self._broker if self._broker is not None else self.store.shell

    def warm(self) -> None:
        """Connect and load the submit's scripts now, so the first submit is as quick as the
        next."""
        try:
            self.store.shell.load(_SCRIPTS)
            if self.apart:
                self.broker.load(("job_send",))
        except (redis.RedisError, RedisClusterException) as err:
            raise BrokerUnavailable(f"Redis is unavailable: {reason(err)}") from err

    def _send(self, submissions: list[Submission]) -> list[list[Any] | Failed]:
        """Run submissions' calls: each one's replies, record's then message's, or ``Failed``.
        Raises only if nothing was written (a record's round trip failed)."""
        if not self.apart:
            return self.store.shell.run_groups(_together(submissions))[:len(submissions)]
        records = self.store.shell.run_groups([list(s.calls) for s in submissions],
                                              transaction=_whole(self.store.shell, submissions))
        written = _written(records)
        self.store.shell.follow(_indexes(submissions, written))
        try:
            sent = self.broker.run_groups(_sends(submissions, written))
        except UNAVAILABLE as err:
            sent = [_unknown(err)] * len(written)
        return _joined(records, sent)

    def enqueue(self, kind: Kind, first: Any, params: Mapping[str, Any], *,
                job_id: str | None = None, fields: Mapping[str, str] | None = None) -> str:
        """Validate, record and send a job; its id (``InvalidJob`` names a bad field).

        ``job_id`` fixes the id (a batch line's): enqueued again, the record is kept
        and the second message is a duplicate the workers drop, not a second call.
        ``fields`` go into the job record.
        """
        submission = self.submissions.build(kind, first, params, job_id=job_id, fields=fields)
        try:
            [outcome] = self._send([submission])
        except UNAVAILABLE as err:
            # the transaction ran whole or not at all: no record waits for a lost message
            raise _seen(err) from err
        error, orphaned = _outcome(outcome)
        if orphaned:  # no record may wait for a message that was not sent
            with contextlib.suppress(redis.RedisError):
                self.store.forget(submission.job_id)
        if error is not None:
            raise error
        if _created(outcome):
            metrics.submitted(self.settings, submission.record)
        return submission.job_id

    def send_all(self, submissions: list[Submission]) -> list[Exception | None]:
        """Send built submissions in one round trip and one transaction (the batch pump's
        lines): each one's error, or None. A failed one is left as it is: its sender knows
        whether to send it again."""
        if not submissions:
            return []
        try:
            outcomes = self._send(submissions)
        except UNAVAILABLE as err:
            return [_seen(err)] * len(submissions)
        for submission, outcome in zip(submissions, outcomes, strict=True):
            if _created(outcome):  # not a line sent again: its job was counted then
                metrics.submitted(self.settings, submission.record)
        return [_outcome(outcome)[0] for outcome in outcomes]


class AsyncEnqueuer:
    """``Enqueuer`` on asyncio (the gateway): the same submissions, run by ``AsyncJobStore``.

    Submits that arrive while one round trip is out go together in the next, in one
    transaction: under load one round trip carries many, at a fraction of the CPU each.
    """

    def __init__(self, settings: Settings, store: AsyncJobStore,
                 broker: AsyncShell | None = None) -> None:
        self.settings = settings
        self.store = store
        self.apart = settings.redis.split  # the broker on a Redis of its own, as Submissions
        if self.apart and broker is None:
            raise ValueError("the broker is apart from the state (redis.state_url): give its shell")
        self.broker = broker or store.shell  # the broker's Redis (the state's, unless apart)
        self.submissions = Submissions(settings, store.records)
        self._waiting: list[tuple[Submission, asyncio.Future[None]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def warm(self) -> None:
        """Connect and load the submit's scripts now."""
        try:
            await self.store.shell.load(_SCRIPTS)
            if self.apart:
                await self.broker.load(("job_send",))
        except (redis.RedisError, RedisClusterException) as err:
            raise BrokerUnavailable(f"Redis is unavailable: {reason(err)}") from err

    async def send(self, submission: Submission) -> None:
        """Send a built submission whole; a caller who stops waiting does not stop it."""
        sent = asyncio.get_running_loop().create_future()
        self._waiting.append((submission, sent))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_waiting())
        with anyio.CancelScope(shield=True):  # the caller learns how its send ended
            await sent

    async def _send_waiting(self) -> None:
        batch: list[tuple[Submission, asyncio.Future[None]]] = []
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[:_BATCH], self._waiting[_BATCH:]
                await self._send_batch(batch)
        finally:  # cancelled (the gateway stops): nobody may wait for ever
            self._sender = None
            for _, sent in [*batch, *self._waiting]:
                if not sent.done():
                    sent.set_exception(BrokerUnavailable("the gateway is stopping"))
            self._waiting = []

    async def _send(self, submissions: list[Submission]) -> list[list[Any] | Failed]:
        """``Enqueuer._send`` on asyncio."""
        if not self.apart:
            return (await self.store.shell.run_groups(_together(submissions)))[
                :len(submissions)]
        records = await self.store.shell.run_groups(
            [list(s.calls) for s in submissions], transaction=_whole(self.store.shell, submissions))
        written = _written(records)
        await self.store.shell.follow(_indexes(submissions, written))
        try:
            sent = await self.broker.run_groups(_sends(submissions, written))
        except UNAVAILABLE as err:
            sent = [_unknown(err)] * len(written)
        return _joined(records, sent)

    async def _send_batch(self, batch: list[tuple[Submission, asyncio.Future[None]]]) -> None:
        replies: list[Any] = [None] * len(batch)
        try:
            replies = await self._send([submission for submission, _ in batch])
            outcomes = [_outcome(outcome) for outcome in replies]
        except Exception as err:  # the round trip failed: the transaction ran whole or not
            outcomes = [(_seen(err), False)] * len(batch)
        orphans = [submission.job_id for (submission, _), (_, orphaned)
                   in zip(batch, outcomes, strict=True) if orphaned]
        if orphans:  # no record may wait for a message that was not sent
            with contextlib.suppress(redis.RedisError):
                await self.store.shell.run_groups(
                    [[self.store.records.forget(job_id)] for job_id in orphans])
        for (submission, sent), (error, _), reply in zip(batch, outcomes, replies, strict=True):
            if error is not None:
                sent.set_exception(error)
            else:
                if _created(reply):
                    metrics.submitted(self.settings, submission.record)
                sent.set_result(None)
