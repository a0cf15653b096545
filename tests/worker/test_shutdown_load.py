"""A graceful shutdown at load: 200 jobs in flight at the default concurrency, none lost.

When the grace ends every thread gives its job back at once; a give-back that
fails (pool exhausted, Redis refusing connections) must not orphan the job.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import yaml

from api_tasks import JobStatus
from api_tasks.client import Client
from config.loader import load_settings
from tests.support.fake_upstream import FakeUpstream, Reply
from tests.support.figures import Figures, outcomes
from tests.support.services import RedisServer, Spawn
from tests.support.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.integration, pytest.mark.faults]
USER = [{"role": "user", "content": "Hello"}]
JOBS = 200  # the default concurrency: every thread of the worker holds a job


@pytest.fixture
def env(worker_env: dict[str, str], workdir: Path, fake: FakeUpstream) -> dict[str, str]:
    """Default worker settings but a short grace; a private prefix for the test's jobs."""
    config = workdir / f"shutdown-{uuid.uuid4().hex[:6]}.yaml"
    config.write_text(yaml.safe_dump({
        "worker": {"shutdown_grace": 3},
        "upstreams": [{"name": "fake", "base_url": fake.base_url,
                       "timeouts": {"connect": 5, "read": 60, "total": 120}}]}))
    return {**worker_env, "API_TASKS_CONFIG": str(config), "API_TASKS_LOG_LEVEL": "INFO",
            "API_TASKS_PREFIX": f"sd{uuid.uuid4().hex[:6]}"}


@pytest.fixture
def redis_proxy(redis_server: RedisServer) -> Iterator[TcpProxy]:
    proxy = TcpProxy(redis_server.port).start()
    yield proxy
    proxy.stop()


def _run(env: dict[str, str], first_env: dict[str, str], fake: FakeUpstream, spawn: Spawn,
         model: str, during_giveback: Callable[[], None] | None = None,
         ) -> tuple[list[str], float, int]:
    fake.script(model, *[Reply(delay=20.0)] * JOBS, Reply(content="second worker"))
    client = Client(load_settings(env=env))
    first = spawn(first_env, "a", concurrency=JOBS)
    jobs = [client.submit_chat(USER, model=model) for _ in range(JOBS)]
    fake.wait_for_requests(model, JOBS, timeout=60)
    first.signal(signal.SIGTERM)
    signalled = time.monotonic()
    if during_giveback is not None:
        during_giveback()
    assert first.wait(timeout=30) == 0
    second = spawn(env, "b", concurrency=JOBS)
    for job in jobs:
        response = job.result(timeout=120)
        assert response is not None
        assert response["choices"][0]["message"]["content"] == "second worker"
    recovered = time.monotonic() - signalled
    ids = [job.id for job in jobs]
    counted = outcomes(lambda: [first.log(), second.log()], ids)
    assert counted == [1] * JOBS
    assert all(job.status() is JobStatus.SUCCEEDED for job in jobs)
    calls = len(fake.requests(model))
    assert calls == 2 * JOBS  # each job once before the SIGTERM, once after
    return [first.log(), second.log()], recovered, counted.count(0)


def test_sigterm_with_200_jobs_in_flight_requeues_every_one(
        env: dict[str, str], fake: FakeUpstream, spawn: Spawn, model: str,
        figures: Figures) -> None:
    # the largest redis-py the project allows (redis<9): its pools cap at 100 by default
    assert redis.VERSION >= (8, 0)
    logs, recovered, lost = _run(env, env, fake, spawn, model)
    assert "Too many connections" not in logs[0]
    assert "delivery dropped" not in logs[1]  # no redelivery met a stale lease and was acked
    figures.add(f"SIGTERM with {JOBS} jobs in flight, concurrency {JOBS}, grace 3 s", JOBS,
                lost, 0, 0, recovered)


def test_sigterm_when_redis_refuses_the_giveback_loses_nothing(
        env: dict[str, str], redis_proxy: TcpProxy, fake: FakeUpstream, spawn: Spawn,
        model: str, figures: Figures) -> None:
    """Redis refuses the give-backs but is back for the requeues a moment later: each
    requeued message then meets a lease its worker could not drop."""
    proxied = {**env, "REDIS_URL": redis_proxy.url}

    def refuse_around_grace_end() -> None:
        time.sleep(1.7)  # the calls are aborted 1 s before the 3-s grace ends
        redis_proxy.refuse()
        time.sleep(0.8)  # the give-backs fail; the requeues come 1 s after them
        redis_proxy.allow()

    logs, recovered, lost = _run(env, proxied, fake, spawn, model, refuse_around_grace_end)
    assert "Redis unavailable" in logs[0]  # the give-backs did fail
    figures.add(f"SIGTERM with {JOBS} jobs in flight, Redis refusing the give-backs", JOBS,
                lost, 0, 0, recovered)
