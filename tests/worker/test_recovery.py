"""Dead workers: their jobs are found and run again, each with exactly one outcome."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
import redis
import yaml
from celery import Celery

from api_tasks import JobFailed, JobStatus, StreamRestarted
from api_tasks.client import Client
from api_tasks.record.reader import Job
from config.loader import load_settings
from tests.support.fake_upstream import FakeUpstream, Hang, Reply
from tests.support.figures import Figures, outcomes
from tests.support.services import Spawn, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.faults]
USER = [{"role": "user", "content": "Hello"}]


@pytest.fixture
def env(worker_env: dict[str, str], workdir: Path, fake: FakeUpstream) -> dict[str, str]:
    """A private prefix, short leases and a one-hour visibility timeout."""
    config = workdir / f"recovery-{uuid.uuid4().hex[:6]}.yaml"
    config.write_text(yaml.safe_dump({
        "worker": {"lease_ttl": 2, "reap_interval": 0.5, "watchdog_interval": 0.2,
                   "visibility_timeout": 3600, "shutdown_grace": 3},
        "jobs": {"max_crashes": 3},
        "upstreams": [{"name": "fake", "base_url": fake.base_url,
                       "timeouts": {"connect": 2, "read": 30, "total": 60}}]}))
    return {**worker_env, "API_TASKS_CONFIG": str(config),
            "API_TASKS_PREFIX": f"rec{uuid.uuid4().hex[:6]}"}


@pytest.fixture
def client(env: dict[str, str]) -> Client:
    return Client(load_settings(env=env))


def _outcomes(spawn: Spawn, jobs: list[Job]) -> list[int]:
    return outcomes(spawn.logs, [job.id for job in jobs])


def test_sigkill_with_100_jobs_in_flight_loses_none(
        env: dict[str, str], client: Client, fake: FakeUpstream,
        spawn: Spawn, model: str, figures: Figures) -> None:
    fake.script(model, Reply(delay=30))  # the doomed worker's calls never come back
    doomed = spawn(env, "doomed", concurrency=120)
    jobs = [client.submit_chat(USER, model=model, stream=i % 2 == 0) for i in range(100)]
    fake.wait_for_requests(model, 100, timeout=30)
    fake.script(model, Reply(content="recovered"))
    doomed.kill()
    started = time.monotonic()
    spawn(env, "heir", concurrency=120)
    for job in jobs:
        response = job.result(timeout=60 - (time.monotonic() - started))
        assert response is not None
        assert response["choices"][0]["message"]["content"] == "recovered"
    recovered_in = time.monotonic() - started
    counted = _outcomes(spawn, jobs)
    assert recovered_in < 60 and counted == [1] * 100
    assert all(job.info()["deliveries"] == "2" for job in jobs)
    repeated = len(fake.requests(model)) - 100
    assert repeated == 100  # each in-flight call was made again, once
    figures.add("SIGKILL a worker with 100 jobs in flight (visibility timeout 1 h)", 100,
                counted.count(0), sum(n - 1 for n in counted if n > 1), repeated,
                recovered_in)


def test_sigkill_mid_stream_restarts_as_an_announced_attempt(
        env: dict[str, str], client: Client, fake: FakeUpstream,
        spawn: Spawn, model: str, figures: Figures) -> None:
    old = Reply(pieces=[f"old{i} " for i in range(200)], chunk_delay=0.05)
    fake.script(model, *[old] * 5, Reply(pieces=["new ", "text"]))
    doomed = spawn(env, "mid", concurrency=120)
    jobs = [client.submit_chat(USER, model=model, stream=True) for _ in range(5)]
    readers = [job.stream(timeout=60) for job in jobs]
    shown = [next(reader) for reader in readers]  # every stream has published chunks
    assert all(shown)
    doomed.kill()
    started = time.monotonic()
    spawn(env, "mid-heir", concurrency=120)
    for job, reader in zip(jobs, readers, strict=True):
        with pytest.raises(StreamRestarted):
            list(reader)
        again = "".join((c["choices"] or [{}])[0].get("delta", {}).get("content") or ""
                        for c in job.stream(timeout=30) if c.get("choices"))
        assert again == "new text"
    counted = _outcomes(spawn, jobs)
    assert counted == [1] * 5
    figures.add("SIGKILL mid-stream: 5 streams restart as announced attempts", 5,
                counted.count(0), 0, len(fake.requests(model)) - 5,
                time.monotonic() - started)


def test_a_second_delivery_of_a_running_job_waits_for_the_lease_then_is_dropped(celery_app: Celery,
        env: dict[str, str], client: Client, fake: FakeUpstream,
        spawn: Spawn, model: str, figures: Figures) -> None:
    fake.script(model, Reply(delay=2.0, content="once"))
    worker = spawn(env, "dup", concurrency=120)
    job = client.submit_chat(USER, model=model)
    fake.wait_for_requests(model, 1, timeout=10)
    assert job.info()["status"] == "running"
    again = {"args": [USER], "kwargs": {"model": model}, "task_id": job.id,
             "queue": "interactive"}
    celery_app.send_task("api_tasks.chat", **again)
    wait_until(lambda: f"job {job.id} is held by another attempt" in worker.log(), 10,
               "the duplicate to be deferred")
    assert job.result(timeout=10) is not None
    # deferred, not acked: it comes back when the lease would have lapsed, and is dropped
    wait_until(lambda: f"job {job.id} is succeeded: delivery dropped" in worker.log(), 10,
               "the deferred duplicate to be dropped")
    celery_app.send_task("api_tasks.chat", **again)
    wait_until(lambda: f"job {job.id} is succeeded: delivery dropped" in worker.log(), 10,
               "the late duplicate to be dropped")
    assert len(fake.requests(model)) == 1
    counted = _outcomes(spawn, [job])
    assert counted == [1]
    figures.add("the same job delivered again while running, then after it ended", 1, 0,
                counted[0] - 1, len(fake.requests(model)) - 1)


def test_a_poison_job_is_stopped_and_others_keep_flowing(
        env: dict[str, str], client: Client, fake: FakeUpstream,
        spawn: Spawn, model: str, figures: Figures) -> None:
    poison_model, healthy_model = model + "-poison", model + "-ok"
    fake.script(poison_model, Hang(max_seconds=30))
    poison = client.submit_chat(USER, model=poison_model)
    healthy = []
    for crash in range(1, 4):
        current = spawn(env, f"p{crash}", concurrency=120)
        fake.wait_for_requests(poison_model, crash, timeout=30)
        healthy.append(client.submit_chat(USER, model=healthy_model))
        assert healthy[-1].result(timeout=20) is not None
        outcomes(spawn.logs, [healthy[-1].id])  # logged before the kill
        current.kill()  # the poison job "kills" its worker
    spawn(env, "p4", concurrency=120)
    with pytest.raises(JobFailed) as caught:
        poison.result(timeout=30)
    assert caught.value.error["code"] == "poison_job"
    assert poison.status() is JobStatus.FAILED and poison.info()["crashes"] == "3"
    assert len(fake.requests(poison_model)) == 3
    counted = _outcomes(spawn, [poison, *healthy])
    assert counted == [1] * 4
    figures.add("a poison job that kills its worker on every delivery (max_crashes 3), "
                "3 healthy jobs beside it", 4, counted.count(0), 0,
                len(fake.requests(poison_model)) - 1)


def test_a_running_job_whose_message_is_gone_is_sent_again(
        env: dict[str, str], client: Client, fake: FakeUpstream, spawn: Spawn, model: str,
        redis_client: redis.Redis, broker_client: redis.Redis, figures: Figures) -> None:
    """No single lost write may orphan a job: its worker dies and its message is gone
    from the broker too (as after a failed give-back), yet the job runs again, once."""
    fake.script(model, Reply(delay=30), Reply(content="recovered"))
    doomed = spawn(env, "orphan", concurrency=4)
    job = client.submit_chat(USER, model=model)
    fake.wait_for_requests(model, 1, timeout=10)
    doomed.kill()
    celery = client.keys.celery_prefix()
    tags = broker_client.hkeys(celery + "unacked")
    assert len(tags) == 1
    broker_client.hdel(celery + "unacked", *tags)  # the message is lost with its worker
    broker_client.zrem(celery + "unacked_index", *tags)
    assert job.info()["status"] == "running"
    started = time.monotonic()
    heir = spawn(env, "orphan-heir", concurrency=4)
    response = job.result(timeout=30)
    assert response is not None and response["choices"][0]["message"]["content"] == "recovered"
    assert "was running with no worker and no message; sent again" in heir.log()
    shard = client.keys.shard(job.id)
    assert not redis_client.hexists(client.keys.running_messages(shard), job.id)  # gone with it
    assert not redis_client.zscore(client.keys.running(shard), job.id)
    assert job.info()["crashes"] == "1"  # its worker was lost, as far as anyone can tell
    counted = _outcomes(spawn, [job])
    assert counted == [1]
    figures.add("a running job whose worker died and whose message was lost", 1,
                counted.count(0), 0, len(fake.requests(model)) - 1,
                time.monotonic() - started)
