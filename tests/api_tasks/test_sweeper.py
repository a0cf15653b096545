"""One worker process of a cluster sweeps at a time (``execution.sweeper``), another takes
over when it stops or dies, and the sweeping scheduler sleeps until a job is due or parked."""

from __future__ import annotations

import time
import uuid

import pytest
import redis

from api_tasks.execution import sweeper
from api_tasks.execution.scheduler import Scheduler
from api_tasks.execution.sweeper import SweeperRole
from api_tasks.record.keys import Keys
from api_tasks.record.leases import LeaseStore
from tests.support.services import wait_until

pytestmark = pytest.mark.integration


def test_one_process_holds_the_role_and_another_takes_it_when_it_stops_or_dies(
        redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sweeper, "_EVERY", 0.1)
    monkeypatch.setattr(sweeper, "_TTL", 2.0)  # a starved thread keeps the role 1.5 s
    monkeypatch.setattr(sweeper, "_MARGIN", 0.5)
    keys = Keys(f"sweep{uuid.uuid4().hex[:8]}")
    first, second = (SweeperRole(redis_client, keys, name) for name in ("first", "second"))
    first.start()
    second.start()
    try:
        assert first.held and not second.held  # the first to ask has it
        renewals: set[float] = set()

        def renewed() -> bool:
            assert first.held and not second.held
            renewals.add(first._until)
            return len(renewals) >= 25  # past its TTL of 2 s: renewed, never taken over
        wait_until(renewed, 5, "the holder to renew its role a few times")
        first.stop()  # hands it back: the other takes it at its next ask
        assert not first.held
        wait_until(lambda: second.held, 2, "the second process to take the role")
        assert redis_client.get(keys.sweeper()) == b"second"
        second._stopping.set()  # dies: no renewal, no hand-back
        second._thread.join(2)
        third = SweeperRole(redis_client, keys, "third")
        third.start()
        assert not third.held  # the dead holder's role has not lapsed yet
        wait_until(lambda: third.held, 6, "the role to lapse and be taken")
        assert not second.held  # its own view lapsed before the role did
        third.stop()
    finally:
        first.stop()
        second.stop()


def test_the_sweeping_scheduler_sends_a_job_parked_while_it_slept(
        redis_client: redis.Redis) -> None:
    """An idle scheduler blocks on the wake list for up to a second; a job parked meanwhile
    for 50 ms leaves a token there, and is sent within a few tenths of a second, not a
    second later."""
    keys = Keys(f"sweep{uuid.uuid4().hex[:8]}")
    leases = LeaseStore(redis_client, keys, 3600, 30_000, 3)
    sent: list[tuple[str, float]] = []
    scheduler = Scheduler(redis_client, keys, leases,
                          lambda job_id, _message: sent.append((job_id, time.monotonic())))
    scheduler.start()
    try:
        wait_until(lambda: redis_client.client_list() and any(
            c.get("cmd") == "blpop" for c in redis_client.client_list()), 5,
            "the scheduler to wait on its wake list")
        token = "t1"
        job_id = f"job-{uuid.uuid4().hex[:8]}"
        redis_client.hset(keys.job(job_id), mapping={"status": "running", "token": token})
        redis_client.set(keys.lease(job_id), token, px=30_000)
        parked_at = time.monotonic()
        leases.park(job_id, token, 0.05, "limit", '{"task": "t"}')
        wait_until(lambda: sent, 5, "the parked job to be sent again")
        assert sent[0][0] == job_id
        assert sent[0][1] - parked_at < 0.5
    finally:
        scheduler.stop()
