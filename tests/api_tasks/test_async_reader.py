"""The asyncio side of the record (``AsyncJobStore``, ``AsyncJob``) reads and writes what the
sync side does, through the same calls: same chunks, same result, same errors, same cancel."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import pytest

from api_tasks.client import Client
from api_tasks.errors import JobCancelled, JobFailed, JobNotFound, JobTimeout
from api_tasks.record.job_record import JobStatus, queued
from api_tasks.record.reader import AsyncJob
from api_tasks.record.store import AsyncJobStore
from config.settings import Settings
from tests.support.async_store import run_with_store
from tests.support.fake_upstream import FakeUpstream, HttpError, Reply

pytestmark = pytest.mark.integration
USER = [{"role": "user", "content": "Hello"}]
PIECES = [f"w{i} " for i in range(12)]
T = TypeVar("T")


async def _all(items: AsyncIterator[T]) -> list[T]:
    return [item async for item in items]


def test_async_reader_sees_what_the_sync_reader_sees(client: Client, settings: Settings,
                                                    fake: FakeUpstream, model: str) -> None:
    fake.script(model, Reply(pieces=PIECES, chunk_delay=0.005))
    job = client.submit_chat(USER, model=model, stream=True)

    async def read(store: AsyncJobStore) -> tuple[list[Any], Any, dict[str, Any], Any]:
        handle = AsyncJob(store, job.id)
        chunks = await _all(handle.stream(timeout=20))  # live, while the job runs
        return chunks, await handle.result(timeout=5), await handle.describe(), \
            await handle.status()

    chunks, result, view, status = run_with_store(settings, read)
    assert chunks == list(job.stream(timeout=5))
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                   if c["choices"]) == "".join(PIECES)
    assert result == job.result(timeout=5)
    assert view == job.describe()
    assert status is JobStatus.SUCCEEDED


def test_async_reader_raises_the_failure(client: Client, settings: Settings,
                                         fake: FakeUpstream, model: str) -> None:
    fake.script(model, HttpError(400, error={"message": "bad things", "code": "bad"}))
    job = client.submit_chat(USER, model=model)

    async def read(store: AsyncJobStore) -> BaseException:
        with pytest.raises(JobFailed) as failed:
            await AsyncJob(store, job.id).result(timeout=20)
        return failed.value

    error = run_with_store(settings, read)
    with pytest.raises(JobFailed) as sync_failed:
        job.result(timeout=5)
    assert getattr(error, "error", None) == sync_failed.value.error
    assert sync_failed.value.error["code"] == "bad"


def test_async_cancel_of_a_queued_job_and_the_calls_in_one_round_trip(
        client: Client, settings: Settings) -> None:
    job_id = f"async-{uuid.uuid4().hex}"  # a record with no message: it stays queued

    async def cancel(store: AsyncJobStore) -> tuple[list[Any], bool, bool]:
        records = store.records
        # a script and plain commands in one pipeline, parsed as one call each
        created, status, absent = await store.shell.run_all([
            records.create(job_id, queued({"kind": "chat"})), records.status(job_id),
            records.status(job_id + "-none")])
        handle = AsyncJob(store, job_id)
        with pytest.raises(JobTimeout):
            await handle.result(timeout=0.3)
        cancelled = await handle.cancel()
        with pytest.raises(JobCancelled):
            await handle.result(timeout=5)
        return [created, status, absent], cancelled, await handle.cancel()

    replies, cancelled, again = run_with_store(settings, cancel)
    assert replies == [True, "queued", None]
    assert cancelled is True and again is False  # the second finds it ended
    assert client.job(job_id).status() is JobStatus.CANCELLED
    with pytest.raises(JobCancelled):
        client.job(job_id).result(timeout=5)
    assert client.store.discard(job_id)


def test_async_reader_of_a_missing_job(settings: Settings, client: Client) -> None:
    async def read(store: AsyncJobStore) -> None:
        handle = AsyncJob(store, "no-such-job")
        with pytest.raises(JobNotFound):
            await handle.status()
        with pytest.raises(JobNotFound):
            await handle.cancel()
    run_with_store(settings, read)


def test_pipelined_scripts_survive_a_redis_that_forgot_them(settings: Settings,
                                                            redis_client: Any) -> None:
    """Both shells send pipelined scripts by EVALSHA alone; a Redis that lost its scripts
    (restarted, SCRIPT FLUSH) gets them loaded again, and the calls still run once."""
    from api_tasks.record.store import JobStore

    keys = Client(settings).keys
    store = JobStore(redis_client, keys, settings.jobs.result_ttl, settings.jobs.queued_ttl)
    fields = {"kind": "chat", "owner": "flush-test"}
    for _ in range(2):
        redis_client.script_flush()
        sync_id = str(uuid.uuid4())
        assert store.create(sync_id, fields) is True
        assert store.create(sync_id, fields) is False  # created once: the second is refused

        async def create(store: AsyncJobStore) -> tuple[bool, bool]:
            job_id = str(uuid.uuid4())
            return await store.create(job_id, fields), await store.create(job_id, fields)
        redis_client.script_flush()
        assert run_with_store(settings, create) == (True, False)
    assert redis_client.zcard(keys.owned("flush-test")) == 4


def test_a_listing_shows_only_the_owners_live_jobs_and_prunes_the_rest(
        settings: Settings, redis_client: Any) -> None:
    keys = Client(settings).keys
    owner, other = f"o{uuid.uuid4().hex[:6]}", f"x{uuid.uuid4().hex[:6]}"

    async def body(store: AsyncJobStore) -> tuple[Any, Any, Any]:
        ours = [str(uuid.uuid4()) for _ in range(3)]
        for job_id in ours:
            assert await store.create(job_id, {"kind": "chat", "owner": owner})
        theirs = str(uuid.uuid4())
        assert await store.create(theirs, {"kind": "chat", "owner": other})
        # another owner's id in this index (an id reused), and many expired entries
        redis_client.zadd(keys.owned(owner), {theirs: 1e17})
        redis_client.zadd(keys.owned(owner), {f"gone-{i}": 1e17 + i for i in range(100)})
        first = await store.owned(owner, None, 2)
        rest = await store.owned(owner, first[0][-1][0], 2) if first else None
        return ours, first, rest

    ours, first, rest = run_with_store(settings, body)
    assert first is not None and rest is not None
    assert [job_id for job_id, _ in first[0]] == [ours[2], ours[1]] and first[1] is True
    assert [job_id for job_id, _ in rest[0]] == [ours[0]] and rest[1] is False
    assert redis_client.zcard(keys.owned(owner)) == 3  # only the owner's live jobs are left
    assert run_with_store(settings, lambda store: store.owned(owner, "no-such-job", 2)) is None
