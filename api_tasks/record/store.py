"""A job's record in Redis, as producers see it: created at submit, read, cancelled.

``JobRecords`` builds each call and parses its reply (``api_tasks.record.calls``);
``JobStore`` runs them on a sync client, ``AsyncJobStore`` on asyncio, so the
producer, the workers and the HTTP gateway share one implementation. The
worker's side (claim, lease, finish) is ``api_tasks.record.leases``. State
changes that must not race are Lua scripts, so they hold across any number of
processes and machines. Every key written here gets a TTL.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, cast

import redis
import redis.asyncio

from api_tasks.connections import text, text_map
from api_tasks.record.calls import AsyncShell, Call, SyncShell, command, lua
from api_tasks.record.events import EVENT_FIELD, final_event, parse_entries
from api_tasks.record.hub import EventHub
from api_tasks.record.job_record import Field, JobStatus, envelope, meta_from, queued
from api_tasks.record.keys import Keys
from api_tasks.record.webhooks import NO_WEBHOOKS, Webhooks

__all__ = ["READ_COUNT", "AsyncJobStore", "Cancel", "JobRecords", "JobStore", "OwnerIndex",
           "owned_page"]

READ_COUNT = 500  # events per XREAD
_STALE_SCAN = 20  # reads of an owner's index one listing may make past expired entries
_STALE_STEP = 100  # ids per read once expired entries are met
_CANCELLED = {"type": "cancelled", "code": "cancelled", "status": None, "param": None,
              "message": "the job was cancelled before it started"}


def _optional_text(reply: Any) -> str | None:
    return None if reply is None else text(reply)


def _envelope(reply: Any) -> dict[str, Any] | None:
    return None if reply is None else json.loads(reply)


def _first_stream(reply: Any) -> list[dict[str, Any]]:
    return parse_entries(reply[0][1]) if reply else []  # RESP2: [[key, [(id, fields)...]]]


class Cancel(StrEnum):
    """What asking a job to stop found."""

    CANCELLED = "cancelled"  # it had not started: it ended, cancelled, now
    CANCELLING = "cancelling"  # it is running: its worker stops it and records the end
    RUNNING = "running"  # it is running, and only a job not yet started was to be cancelled
    ENDED = "ended"  # it had already ended
    MISSING = "missing"  # no such job

    @property
    def stops(self) -> bool:
        """Whether the job ends cancelled because of this request."""
        return self in (Cancel.CANCELLED, Cancel.CANCELLING)


# what queues a job's webhook event: (owner, event, job id) -> add_webhooks' KEYS and ARGV
Notifier = Callable[[str, str, str], Webhooks]


class JobRecords:
    """The calls that create, read and cancel job records (no I/O: a shell runs them)."""

    def __init__(self, keys: Keys, result_ttl: int, queued_ttl: int,
                 notifier: Notifier | None = None) -> None:
        self.keys = keys
        self.result_ttl = result_ttl
        self.queued_ttl = queued_ttl
        self.notifier = notifier

    def create(self, job_id: str, record: dict[str, str],
               send: tuple[str, bytes] | None = None) -> Call[bool]:
        """Write a new job's record (``queued(fields)``); False if the id already has one.
        With ``send`` (a lane's key and a task message), push the message in the same script."""
        flat = [item for pair in record.items() for item in pair]
        keys = [self.keys.job(job_id)] if send is None else [self.keys.job(job_id), send[0]]
        return lua("job_create", keys, [self.queued_ttl, "" if send is None else send[1],
                                        *flat], bool)

    def index(self, job_id: str, fields: dict[str, str]) -> Call[Any] | None:
        """For a job just created with ``fields``: add it to its owner's index, if it has an
        owner (a gateway key; entries older than any record lives drop out)."""
        owner = fields.get(Field.OWNER)
        if not owner:
            return None
        return lua("owner_index", [self.keys.owned(owner)],
                   [job_id, self.queued_ttl + self.result_ttl])

    def forget(self, job_id: str) -> Call[bool]:
        """Delete the record of a job whose message may not have been sent, unless a worker
        has seen it already (the send did go out); True if deleted."""
        return lua("job_forget", [self.keys.job(job_id)], [], bool)

    def discard(self, job_id: str) -> Call[bool]:
        """Delete an ended job's record, result and stream (its id may run again); False
        if it has not ended."""
        keys = self.keys
        return lua("job_discard", [keys.job(job_id), keys.result(job_id), keys.events(job_id),
                                   keys.cancel(job_id)], [], bool)

    def cancel(self, job_id: str, info: dict[str, str], queued_only: bool) -> list[Call[Any]]:
        """Ask a job to stop (``info``: its record); with ``queued_only`` a running job is
        left to finish. A job that ends here tells its owner's webhooks if it asked to (the
        calls after the first, whose reply is the ``Cancel``)."""
        result = envelope(job_id, JobStatus.CANCELLED, meta_from(info), error=_CANCELLED)
        event = final_event(JobStatus.CANCELLED, 0, 0, error=_CANCELLED)
        keys = self.keys
        owner = info.get(Field.OWNER)
        hooks = self.notifier(owner, "job.cancelled", job_id) \
            if self.notifier and owner and info.get(Field.NOTIFY) == "1" else NO_WEBHOOKS
        return [lua("job_cancel",
                    [keys.job(job_id), keys.cancel(job_id), keys.result(job_id),
                     keys.events(job_id), *hooks.keys],
                    [repr(time.time()), self.result_ttl, result, event, EVENT_FIELD,
                     "1" if queued_only else "0", keys.channel(job_id), *hooks.args],
                    lambda reply: Cancel(text(reply[0]))), *hooks.after]

    def status(self, job_id: str) -> Call[str | None]:
        """The job's status, or None if there is no such job."""
        return command("HGET", self.keys.job(job_id), Field.STATUS.value, parse=_optional_text)

    def info(self, job_id: str) -> Call[dict[str, str]]:
        """The whole job record (empty if there is none)."""
        return command("HGETALL", self.keys.job(job_id), parse=text_map)

    def result(self, job_id: str) -> Call[dict[str, Any] | None]:
        """The stored result envelope, if any."""
        return command("GET", self.keys.result(job_id), parse=_envelope)

    def tail(self, job_id: str) -> Call[list[dict[str, Any]]]:
        """The newest event of the job's stream (none if it is empty)."""
        return command("XREVRANGE", self.keys.events(job_id), "+", "-", "COUNT", 1,
                       parse=parse_entries)

    def read(self, job_id: str, after: str,
             block_ms: int | None = None) -> Call[list[dict[str, Any]]]:
        """Up to ``READ_COUNT`` events after stream id ``after``, waiting up to ``block_ms``
        for the first (None: not at all)."""
        block = () if block_ms is None else ("BLOCK", block_ms)
        return command("XREAD", "COUNT", READ_COUNT, *block, "STREAMS",
                       self.keys.events(job_id), after, parse=_first_stream)


@dataclass(frozen=True, slots=True)
class OwnerIndex:
    """How to page one owner's index of ids (jobs or files) and read each id's record."""

    owner: str
    page: Callable[[str | None, int], Call[list[str] | None]]  # (after, count) -> ids
    record: Callable[[str], Call[dict[str, str]]]
    unindex: Callable[[list[str]], Call[Any]]

    @classmethod
    def sorted_set(cls, owner: str, key: str, record: Callable[[str], Call[dict[str, str]]],
                   oldest_first: bool = False) -> OwnerIndex:
        """An owner's index kept as sorted set ``key`` (``owner_page.lua``), newest first
        unless ``oldest_first``; each id's record read by ``record``."""
        order = "asc" if oldest_first else "desc"
        return cls(owner, lambda after, count: lua(
            "owner_page", [key], [after or "", count, order],
            lambda reply: None if reply is None else [text(item) for item in reply]),
            record, lambda ids: command("ZREM", key, *ids))


async def owned_page(shell: AsyncShell, index: OwnerIndex, after: str | None,
                     limit: int) -> tuple[list[tuple[str, dict[str, str]]], bool] | None:
    """Up to ``limit`` of an owner's ids with their records, after ``after``, and whether more
    may follow; None if ``after`` is not in the index. Ids whose records expired (or are
    another owner's) leave the index as they are met, at most ``_STALE_SCAN`` reads a call (a
    page may then be short), so one listing's work stays bounded."""
    found: list[tuple[str, dict[str, str]]] = []
    pruning = False
    for read in range(_STALE_SCAN):
        # past expired entries, read in larger steps: they come in runs
        asked = max(limit + 1 - len(found), _STALE_STEP if pruning else 0)
        ids = await shell.run(index.page(after, asked))
        if ids is None:  # the cursor is not in the index
            if read == 0:
                return None
            return found, True  # another listing dropped our place: this is the page
        records = await shell.run_all([index.record(i) for i in ids])
        live = [(i, r) for i, r in zip(ids, records, strict=True)
                if r.get(Field.OWNER) == index.owner]
        stale = [i for i, r in zip(ids, records, strict=True)
                 if r.get(Field.OWNER) != index.owner]
        if stale:  # dropped now, so the next read after the same cursor goes past them
            await shell.run(index.unindex(stale))
            pruning = True
        found += live
        if len(ids) < asked or len(found) > limit:
            return found[:limit], len(found) > limit
        if live:
            after = live[-1][0]
    return found[:limit], True


class JobStore:
    """Job records on a sync client; blocking reads go to ``blocking`` (a longer timeout)."""

    def __init__(self, client: redis.Redis, keys: Keys, result_ttl: int, queued_ttl: int,
                 blocking: redis.Redis | None = None, notifier: Notifier | None = None) -> None:
        self.redis = client
        self.keys = keys
        self.records = JobRecords(keys, result_ttl, queued_ttl, notifier)
        self.shell = SyncShell(client)
        self._blocking = SyncShell(blocking) if blocking is not None else self.shell

    def create(self, job_id: str, fields: dict[str, str]) -> bool:
        """Write a new job's record, status queued; False if the id already has one. A job
        with an owner (a gateway key) goes into its owner's index too."""
        created = self.shell.run(self.records.create(job_id, queued(fields)))
        if created and (index := self.records.index(job_id, fields)) is not None:
            self.shell.run(index)
        return created

    def forget(self, job_id: str) -> bool:
        """Delete a record whose message may not have been sent (see ``JobRecords``)."""
        return self.shell.run(self.records.forget(job_id))

    def discard(self, job_id: str) -> bool:
        """Delete an ended job's record, result and stream; False if it has not ended."""
        return self.shell.run(self.records.discard(job_id))

    def cancel(self, job_id: str, *, queued_only: bool = False) -> Cancel:
        """Ask a job to stop; with ``queued_only`` a running job is left to finish."""
        first, *after = self.records.cancel(job_id, self.info(job_id), queued_only)
        return Cancel(self.shell.run_then(first, after))

    def status(self, job_id: str) -> str | None:
        """The job's status, or None if there is no such job."""
        return self.shell.run(self.records.status(job_id))

    def statuses(self, job_ids: list[str]) -> list[str | None]:
        """Each job's status (None where it has no record), in one round trip."""
        return self.shell.run_all([self.records.status(job_id) for job_id in job_ids])

    def info(self, job_id: str) -> dict[str, str]:
        """The whole job record (empty if there is none)."""
        return self.shell.run(self.records.info(job_id))

    def result(self, job_id: str) -> dict[str, Any] | None:
        """The stored result envelope, if any."""
        return self.shell.run(self.records.result(job_id))

    def results(self, job_ids: list[str]) -> dict[str, dict[str, Any] | None]:
        """Each job's stored result envelope (None where there is none), in one round trip."""
        found = self.shell.run_all([self.records.result(job_id) for job_id in job_ids])
        return dict(zip(job_ids, found, strict=True))

    def tail(self, job_id: str) -> list[dict[str, Any]]:
        """The newest event of the job's stream (none if it is empty)."""
        return self.shell.run(self.records.tail(job_id))

    def read(self, job_id: str, after: str, block_ms: int) -> list[dict[str, Any]]:
        """The events after ``after``, waiting up to ``block_ms`` for the first."""
        return self._blocking.run(self.records.read(job_id, after, block_ms))

    def read_result(self, job_id: str, after: str, block_ms: int
                    ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        """``read``, then the stored result envelope in the same round trip: Redis reads it
        once the wait is over, so after a final event it is there."""
        calls: list[Call[Any]] = [self.records.read(job_id, after, block_ms),
                                  self.records.result(job_id)]
        events, stored = self._blocking.run_all(calls)
        return cast(list[dict[str, Any]], events), cast(dict[str, Any] | None, stored)


class AsyncJobStore:
    """Job records on an asyncio client: ``JobStore``'s methods, awaited."""

    def __init__(self, client: redis.asyncio.Redis, keys: Keys, result_ttl: int,
                 queued_ttl: int, notifier: Notifier | None = None) -> None:
        self.redis = client
        self.keys = keys
        self.records = JobRecords(keys, result_ttl, queued_ttl, notifier)
        self.shell = AsyncShell(client)
        self.hub = EventHub(client)  # waiting readers hold no connection: they listen here

    async def create(self, job_id: str, fields: dict[str, str]) -> bool:
        """Write a new job's record, status queued; False if the id already has one (and
        into its owner's index, as ``JobStore.create``)."""
        created = await self.shell.run(self.records.create(job_id, queued(fields)))
        if created and (index := self.records.index(job_id, fields)) is not None:
            await self.shell.run(index)
        return created

    async def owned(self, owner: str, after: str | None,
                    limit: int) -> tuple[list[tuple[str, dict[str, str]]], bool] | None:
        """Up to ``limit`` of an owner's jobs with their records, newest first, after the
        job ``after`` (as ``owned_page``)."""
        return await owned_page(self.shell, OwnerIndex.sorted_set(
            owner, self.keys.owned(owner), self.records.info), after, limit)

    async def forget(self, job_id: str) -> bool:
        """Delete a record whose message may not have been sent (see ``JobRecords``)."""
        return await self.shell.run(self.records.forget(job_id))

    async def cancel(self, job_id: str, *, queued_only: bool = False) -> Cancel:
        """Ask a job to stop (as ``JobStore.cancel``)."""
        first, *after = self.records.cancel(job_id, await self.info(job_id), queued_only)
        return Cancel(await self.shell.run_then(first, after))

    async def status(self, job_id: str) -> str | None:
        """The job's status, or None if there is no such job."""
        return await self.shell.run(self.records.status(job_id))

    async def info(self, job_id: str) -> dict[str, str]:
        """The whole job record (empty if there is none)."""
        return await self.shell.run(self.records.info(job_id))

    async def result(self, job_id: str) -> dict[str, Any] | None:
        """The stored result envelope, if any."""
        return await self.shell.run(self.records.result(job_id))

    async def tail(self, job_id: str) -> list[dict[str, Any]]:
        """The newest event of the job's stream (none if it is empty)."""
        return await self.shell.run(self.records.tail(job_id))

    async def read(self, job_id: str, after: str) -> list[dict[str, Any]]:
        """Up to ``READ_COUNT`` events after ``after``, without waiting (``hub`` tells when
        there are more)."""
        return await self.shell.run(self.records.read(job_id, after))
