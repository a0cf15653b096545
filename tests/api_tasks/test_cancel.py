"""Cancelling a job: queued ones never run, running ones close their upstream connection."""

from __future__ import annotations

import time

import pytest

from api_tasks import JobCancelled, JobStatus
from api_tasks.client import Client
from tests.support.fake_upstream import FakeUpstream, Hang, Reply
from tests.support.services import WorkerProcess, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.faults]
USER = [{"role": "user", "content": "Hello"}]


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "ends-at-close"])
def test_cancel_a_running_stream_closes_the_upstream_connection(
        client: Client, fake: FakeUpstream, model: str, chunked: bool) -> None:
    fake.script(model, Reply(pieces=[f"w{i} " for i in range(200)], chunk_delay=0.05,
                             chunked=chunked))
    job = client.submit_chat(USER, model=model, stream=True)
    chunks = job.stream(timeout=20)
    next(chunks)
    assert job.cancel() is True
    asked = time.monotonic()
    with pytest.raises(JobCancelled):
        list(chunks)
    fake.wait_for_disconnect(model, timeout=5)
    assert time.monotonic() - asked < 3
    assert job.status() is JobStatus.CANCELLED
    events = list(client.job(job.id).events(timeout=5))
    assert events[-1]["type"] == "cancelled" and events[-1]["error"]["code"] == "cancelled"


def test_cancel_while_waiting_for_a_silent_upstream(client: Client, fake: FakeUpstream,
                                                   model: str) -> None:
    fake.script(model, Hang(max_seconds=30))
    job = client.submit_chat(USER, model=model)
    fake.wait_for_requests(model, 1, timeout=10)
    job.cancel()
    with pytest.raises(JobCancelled):
        job.result(timeout=5)
    fake.wait_for_disconnect(model, timeout=5)


def test_cancel_a_queued_job_means_it_never_runs(client: Client, fake: FakeUpstream,
                                                 worker: WorkerProcess, model: str) -> None:
    # fill the queue behind a burst of slow jobs so ours is still queued
    fake.script(model + "-slow", Reply(delay=1.0))
    blockers = [client.submit_chat(USER, model=model + "-slow") for _ in range(60)]
    job = client.submit_chat(USER, model=model)
    assert job.cancel() is True
    assert job.status() is JobStatus.CANCELLED
    with pytest.raises(JobCancelled):
        job.result(timeout=5)
    for blocker in blockers:
        blocker.result(timeout=30)
    # the worker took the message later: it must leave the job as it was
    dropped = f"job {job.id} is cancelled: delivery dropped"
    wait_until(lambda: dropped in worker.log(), 10, "the delivery")
    assert job.status() is JobStatus.CANCELLED
    events = list(job.events(timeout=5))
    assert [e["type"] for e in events] == ["cancelled"]
    assert fake.requests(model) == []


def test_cancel_a_finished_job_is_a_no_op(client: Client, model: str) -> None:
    job = client.submit_chat(USER, model=model)
    job.result(timeout=20)
    assert job.cancel() is False
    assert job.status() is JobStatus.SUCCEEDED


def test_cancel_during_backoff(client: Client, fake: FakeUpstream, model: str) -> None:
    from tests.support.fake_upstream import HttpError

    fake.script(model, HttpError(429, headers={"Retry-After": "3"}), Reply())
    job = client.submit_chat(USER, model=model)
    fake.wait_for_requests(model, 1, timeout=10)
    wait_until(lambda: job.status() is JobStatus.RUNNING, 5, "job running")
    job.cancel()
    with pytest.raises(JobCancelled):
        job.result(timeout=2.5)
    assert len(fake.requests(model)) == 1
