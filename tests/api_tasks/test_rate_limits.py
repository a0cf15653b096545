"""429s: a cool-down shared by every worker, and out-of-quota errors that are never retried."""

from __future__ import annotations

import uuid

import pytest

from api_tasks import JobFailed
from api_tasks.client import Client
from config.loader import load_settings
from tests.support.fake_upstream import FakeUpstream, HttpError, Reply
from tests.support.services import Spawn, WorkerProcess, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.faults]
USER = [{"role": "user", "content": "Hello"}]


def test_insufficient_quota_fails_at_once(client: Client, fake: FakeUpstream, model: str) -> None:
    fake.script(model, HttpError(429, headers={"Retry-After": "1"}, error={
        "message": "You exceeded your current quota", "type": "insufficient_quota",
        "code": "insufficient_quota"}))
    with pytest.raises(JobFailed) as caught:
        client.submit_chat(USER, model=model).result(timeout=20)
    assert caught.value.error["code"] == "insufficient_quota"
    assert caught.value.error["attempts"] == 1 and len(fake.requests(model)) == 1


def test_a_429_costs_no_attempt(client: Client, fake: FakeUpstream, model: str) -> None:
    # three attempts allowed (the upstream's retry), five 429s first: the job still succeeds
    fake.script(model, *[HttpError(429, headers={"retry-after-ms": "50"})] * 5,
                Reply(content="at last"))
    job = client.submit_chat(USER, model=model)
    assert job.result(timeout=30)["choices"][0]["message"]["content"] == "at last"
    assert len(fake.requests(model)) == 6
    assert job.describe()["calls"] == 6


def test_openai_reset_headers_set_the_wait(client: Client, fake: FakeUpstream, model: str) -> None:
    fake.script(model, HttpError(429, headers={"x-ratelimit-reset-requests": "1.2s",
                                               "x-ratelimit-reset-tokens": "300ms"}), Reply())
    assert client.submit_chat(USER, model=model).result(timeout=20) is not None
    first, second = fake.requests(model)
    assert second.at - first.at >= 1.1


@pytest.fixture
def two_workers(worker_env: dict[str, str],
                spawn: Spawn) -> tuple[dict[str, str], list[WorkerProcess]]:
    env = {**worker_env, "API_TASKS_PREFIX": f"cool{uuid.uuid4().hex[:6]}"}
    return env, [spawn(env, name, concurrency=3) for name in ("c1", "c2")]


def test_a_429_cools_the_whole_upstream_down_for_every_worker(
        two_workers: tuple[dict[str, str], list[WorkerProcess]], fake: FakeUpstream,
        model: str) -> None:
    env, workers = two_workers
    client = Client(load_settings(env={k: v for k, v in env.items()
                                       if k != "FAKE_UPSTREAM_KEY"}))
    fake.script(model + "-a", HttpError(429, headers={"Retry-After": "2"}), Reply())
    first = client.submit_chat(USER, model=model + "-a")
    [limited] = fake.wait_for_requests(model + "-a", 1, timeout=10)
    # the cool-down holds from when the worker has read the 429 and recorded it, not from when
    # the upstream sent it: a job claimed in between rightly goes out
    wait_until(lambda: client.redis.exists(client.keys.cooldown("fake")), 10,
               "the cool-down to be recorded")
    others = [client.submit_chat(USER, model=model + "-b") for _ in range(6)]
    for job in [first, *others]:
        assert job.result(timeout=30) is not None
    calls = fake.requests(model + "-b")
    assert len(calls) == 6
    assert min(call.at for call in calls) - limited.at >= 1.9  # none went during the cool-down
    # both processes held their calls: in the thread (short) or outside the worker (long)
    assert all("cooling down after a 429" in worker.log() or "for its cooldown" in worker.log()
               for worker in workers)
