"""Waiting readers share one pub/sub connection per process (``record.hub``): many readers on
a small pool, a connection killed under them, a reader too slow for what it hears."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import redis

from api_tasks.errors import JobTimeout
from api_tasks.record.events import (
    EVENT_FIELD,
    chunk_event,
    entry_id,
    final_event,
    reset_event,
)
from api_tasks.record.hub import HELD, HUB_NAME
from api_tasks.record.job_record import JobStatus
from api_tasks.record.reader import AsyncJob, follow_on
from api_tasks.record.store import AsyncJobStore
from config.settings import Settings
from tests.support.async_store import run_with_store
from tests.support.services import primaries

pytestmark = pytest.mark.integration
T = TypeVar("T")


def _run(settings: Settings, body: Callable[[AsyncJobStore], Awaitable[T]]) -> T:
    return run_with_store(settings, body, pool=4)  # fewer connections than readers


def _chunk(seq: int, attempt: int = 1) -> bytes:
    return chunk_event(seq, attempt, json.dumps({"n": seq})).encode()


def test_follow_on_takes_the_run_that_continues_and_stops_where_the_stream_is_needed() -> None:
    events, read = follow_on("1-2", [_chunk(0), _chunk(1), _chunk(2), _chunk(3)])
    assert ([e["id"] for e in events], read) == (["1-3", "1-4"], False)  # 0, 1 read already
    assert follow_on("1-2", [_chunk(3)]) == ([], True)  # seq 2 was missed: a gap
    assert follow_on("1-2", [_chunk(2, attempt=2)]) == ([], True)  # another attempt
    final = final_event(JobStatus.SUCCEEDED, 3, 1, finish_reason="stop").encode()
    events, read = follow_on("1-2", [_chunk(2), final, _chunk(9)])
    assert ([(e["id"], e["type"]) for e in events], read) == (
        [("1-3", "chunk"), ("1-4", "done")], False)  # where finish.lua puts it
    assert follow_on("1-2", [final]) == ([], True)  # chunk 2 missed: the stream has the rest
    cancelled = final_event(JobStatus.CANCELLED, 0, 0, error={"code": "cancelled"}).encode()
    assert follow_on("0-0", [cancelled])[0][0]["id"] == "0-1"  # job_cancel.lua's first id
    alone = final_event(JobStatus.SUCCEEDED, 0, 2, finish_reason="stop").encode()
    assert follow_on("0-0", [alone])[0][0]["id"] == "2-1"  # a job's only event
    assert follow_on("1-4", [reset_event(2).encode()]) == ([], True)
    events, read = follow_on("0-0", [_chunk(0, attempt=2), _chunk(1, attempt=2)])
    assert ([e["id"] for e in events], read) == (["2-1", "2-2"], False)  # a first chunk
    assert follow_on("0-0", [_chunk(1)]) == ([], True)  # not the first: the stream has more


def _write(r: redis.Redis, store: AsyncJobStore, job_id: str, first: int, count: int) -> None:
    """What the relay writes for chunks ``first``.. of attempt 1: each entry, then its
    publish."""
    keys = store.keys
    pipe = r.pipeline(transaction=False)
    for seq in range(first, first + count):
        pipe.xadd(keys.events(job_id), {EVENT_FIELD: _chunk(seq)}, id=entry_id(1, seq))
        pipe.execute_command("PUBLISH", keys.channel(job_id), _chunk(seq))  # a cluster's too
    pipe.execute()


def _end(r: redis.Redis, store: AsyncJobStore, job_id: str, seq: int) -> None:
    final = final_event(JobStatus.SUCCEEDED, seq, 1, finish_reason="stop")
    r.hset(store.keys.job(job_id), "status", JobStatus.SUCCEEDED.value)
    r.xadd(store.keys.events(job_id), {EVENT_FIELD: final}, id=entry_id(1, seq))
    r.publish(store.keys.channel(job_id), final)


async def _read_all(store: AsyncJobStore, job_id: str) -> list[str]:
    return [event["id"] async for event in AsyncJob(store, job_id).events(timeout=30)]


async def _until(check: Callable[[], bool], what: str, timeout: float = 15) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)
    assert check(), what


def _subscribers(r: redis.Redis, store: AsyncJobStore, job_ids: list[str]) -> int:
    return sum(count for node in primaries(r)
               for _, count in node.pubsub_numsub(*(store.keys.channel(j) for j in job_ids)))


def _hub_connections(r: redis.Redis) -> list[dict[str, Any]]:
    """This process's hub connections, on whichever node of a cluster they are."""
    return [c for node in primaries(r) for c in node.client_list()
            if c.get("name") == f"{HUB_NAME}-{os.getpid()}"]


def test_hundreds_of_waiting_readers_on_a_pool_of_four(settings: Settings,
                                                       redis_client: redis.Redis) -> None:
    """Each waiting reader held a connection for its XREAD BLOCK: 300 readers on a pool of
    four could not all wait. Here they wait on one subscription connection."""
    job_ids = [f"hub-{uuid.uuid4().hex}" for _ in range(300)]

    async def body(store: AsyncJobStore) -> list[list[str]]:
        for job_id in job_ids:
            await store.create(job_id, {"kind": "chat"})
        readers = [asyncio.create_task(_read_all(store, job_id)) for job_id in job_ids]
        await _until(lambda: _subscribers(redis_client, store, job_ids) == len(job_ids),
                     "every reader subscribed")
        ours = _hub_connections(redis_client)
        assert len(ours) == 1 and int(ours[0]["sub"]) == len(job_ids)
        for job_id in job_ids:
            _write(redis_client, store, job_id, 0, 3)
            _end(redis_client, store, job_id, 3)
        return await asyncio.gather(*readers)

    every = _run(settings, body)
    assert every == [["1-1", "1-2", "1-3", "1-4"]] * len(job_ids)


def test_a_killed_subscription_loses_nothing(settings: Settings,
                                             redis_client: redis.Redis) -> None:
    job_id = f"hub-{uuid.uuid4().hex}"

    async def body(store: AsyncJobStore) -> list[str]:
        await store.create(job_id, {"kind": "chat"})
        reader = asyncio.create_task(_read_all(store, job_id))
        await _until(lambda: _subscribers(redis_client, store, [job_id]) == 1, "subscribed")
        _write(redis_client, store, job_id, 0, 5)
        assert sum(node.client_kill_filter(_type="pubsub") for node in primaries(redis_client)) >= 1
        _write(redis_client, store, job_id, 5, 5)  # published while nobody listened
        await _until(lambda: _subscribers(redis_client, store, [job_id]) == 1, "back")
        _write(redis_client, store, job_id, 10, 5)
        _end(redis_client, store, job_id, 15)
        return await reader

    assert _run(settings, body) == [entry_id(1, seq) for seq in range(16)]


def test_a_reader_slower_than_the_stream_holds_a_bounded_backlog_and_misses_nothing(
        settings: Settings, redis_client: redis.Redis) -> None:
    job_id = f"hub-{uuid.uuid4().hex}"
    total = HELD * 4

    async def body(store: AsyncJobStore) -> tuple[list[str], int]:
        await store.create(job_id, {"kind": "chat"})
        _write(redis_client, store, job_id, 0, 1)
        events = AsyncJob(store, job_id).events(timeout=30)
        ids = [(await anext(events))["id"]]  # the first chunk; then it stops reading a while
        for first in range(1, total, 50):
            _write(redis_client, store, job_id, first, min(50, total - first))
        _end(redis_client, store, job_id, total)
        [entry] = store.hub._channels.values()
        [heard] = entry.followers
        await _until(lambda: heard.lost, "more heard than a reader holds")
        held = len(heard.events)
        ids += [event["id"] async for event in events]
        return ids, held

    ids, held = _run(settings, body)
    assert held <= HELD
    assert ids == [entry_id(1, seq) for seq in range(total + 1)]


def test_a_reader_keeps_its_deadline_while_events_keep_coming(
        settings: Settings, redis_client: redis.Redis) -> None:
    job_id = f"hub-{uuid.uuid4().hex}"

    async def body(store: AsyncJobStore) -> float:
        await store.create(job_id, {"kind": "chat"})

        async def trickle() -> None:
            for seq in range(100):  # a chunk every 50 ms, for five seconds
                _write(redis_client, store, job_id, seq, 1)
                await asyncio.sleep(0.05)

        writer = asyncio.create_task(trickle())
        start = time.monotonic()
        with pytest.raises(JobTimeout):
            async for _ in AsyncJob(store, job_id).events(timeout=0.5):
                pass
        writer.cancel()
        return time.monotonic() - start

    assert _run(settings, body) < 1.5


def test_the_subscription_connection_closes_when_nobody_follows(
        settings: Settings, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """An idle gateway holds no subscription connection: it closes once nobody follows (its
    pings answered plain PONG then, not a pub/sub reply)."""
    from api_tasks.record import hub

    monkeypatch.setattr(hub, "_PING", 0.2)
    monkeypatch.setattr(hub, "_LINGER", 0.5)

    def ours() -> int:
        return len(_hub_connections(redis_client))

    async def body(store: AsyncJobStore) -> None:
        async with store.hub.follow(store.keys.channel(f"hub-{uuid.uuid4().hex}")):
            assert ours() == 1
        await _until(lambda: ours() == 0, "the idle connection to close", timeout=10)
        async with store.hub.follow(store.keys.channel(f"hub-{uuid.uuid4().hex}")):
            assert ours() == 1  # and it opens again when someone follows

    _run(settings, body)


def test_waits_end_at_their_own_deadlines_under_the_hubs_one_timer(
        settings: Settings, redis_client: redis.Redis) -> None:
    """Readers' waits end by the hub's heap of deadlines, not a timer each: each at its own
    deadline, early when something is heard, and a shorter wait after a longer one still on
    time."""
    channel = f"hub-{uuid.uuid4().hex}"

    async def body(store: AsyncJobStore) -> dict[str, tuple[bool, float]]:
        hub, name = store.hub, store.keys.channel(channel)
        ended: dict[str, tuple[bool, float]] = {}

        async def waits(label: str, seconds: float, heard: object) -> None:
            start = time.monotonic()
            woke = await hub.wait(heard, seconds)  # type: ignore[arg-type]
            ended[label] = (woke, time.monotonic() - start)

        async with hub.follow(name) as a, hub.follow(name) as b, hub.follow(name) as c:
            loop = asyncio.get_running_loop()
            short = loop.create_task(waits("short", 5.0, a))
            long_ = loop.create_task(waits("long", 30.0, b))
            await _until(lambda: a.waiting and b.waiting, "both readers to wait")
            await asyncio.to_thread(redis_client.publish, name, b"x")  # heard by all three
            await asyncio.gather(short, long_)
            b.take()
            a.take()
            await waits("after", 0.3, b)  # its 30 s entry is still in the heap
            await waits("alone", 0.2, c)  # heard "x" before it waited: no wait at all
            c.take()
            await waits("timed", 0.25, c)
        return ended

    ended = run_with_store(settings, body, pool=4)
    assert ended["short"][0] and ended["short"][1] < 5  # the publish came first
    assert ended["long"][0] and ended["long"][1] < 5
    assert not ended["after"][0] and 0.25 <= ended["after"][1] < 1.5
    assert ended["alone"][0] and ended["alone"][1] < 0.1
    assert not ended["timed"][0] and 0.2 <= ended["timed"][1] < 1.5
