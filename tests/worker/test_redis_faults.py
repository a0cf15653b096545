"""Redis faults: a restart mid-run, and Redis down when the worker starts."""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import yaml

from api_tasks import BrokerUnavailable
from api_tasks.client import Client
from config.loader import load_settings
from tests.support.fake_upstream import FakeUpstream, Reply
from tests.support.figures import Figures, outcomes
from tests.support.services import RedisServer, Spawn, WorkerProcess, wait_until
from tests.support.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.integration, pytest.mark.faults]
USER = [{"role": "user", "content": "Hello"}]


@pytest.fixture
def own_redis(workdir: Path) -> Iterator[RedisServer]:
    server = RedisServer(workdir / f"redis-{uuid.uuid4().hex[:6]}", persist=True)
    yield server
    server.stop()


@pytest.fixture
def env(worker_env: dict[str, str], own_redis: RedisServer, workdir: Path,
        fake: FakeUpstream) -> dict[str, str]:
    """Short leases, so a long outage outlives them."""
    config = workdir / f"redis-faults-{uuid.uuid4().hex[:6]}.yaml"
    config.write_text(yaml.safe_dump({
        "worker": {"lease_ttl": 2, "reap_interval": 0.5, "watchdog_interval": 0.2},
        "upstreams": [{"name": "fake", "base_url": fake.base_url,
                       "timeouts": {"connect": 2, "read": 30, "total": 60}}]}))
    return {**worker_env, "REDIS_URL": own_redis.url, "API_TASKS_CONFIG": str(config)}


@pytest.mark.parametrize("outage", [0.0, 5.0], ids=["brief", "longer-than-leases"])
def test_redis_crash_and_restart_with_jobs_queued_and_running(
        env: dict[str, str], own_redis: RedisServer, fake: FakeUpstream,
        spawn: Spawn, model: str, figures: Figures, outage: float) -> None:
    own_redis.start()
    fake.script(model, Reply(delay=1.5))
    worker = spawn(env, "w", concurrency=5)
    client = Client(load_settings(env=env))
    jobs = [client.submit_chat(USER, model=model, stream=i % 2 == 0) for i in range(15)]
    fake.wait_for_requests(model, 5, timeout=10)
    own_redis.stop(crash=True)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        client.submit_chat(USER, model=model)
    assert time.monotonic() - started < 10  # a clear error, not a hang
    time.sleep(max(outage - (time.monotonic() - started), 0))  # Redis stays down this long
    own_redis.start()
    for job in jobs:
        assert job.result(timeout=90) is not None
    recovered_in = time.monotonic() - started
    check = redis.Redis.from_url(own_redis.url)
    counts = []
    for job in jobs:
        finals = [json.loads(f[b"event"])["type"] for _, f in check.xrange(client.keys.events(
            job.id)) if json.loads(f[b"event"])["type"] in ("done", "error", "cancelled")]
        assert finals == ["done"], job.id
        counts.append(len(finals))
    counted = outcomes(lambda: [worker.log()], [job.id for job in jobs])
    assert counted == [1] * 15
    figures.add(f"Redis killed (AOF fsync always) and back after {outage or 'a brief'} "
                f"{'s ' if outage else ''}outage, 10 jobs queued and 5 running", 15,
                counted.count(0), sum(n - 1 for n in counted if n > 1),
                len(fake.requests(model)) - 15, recovered_in)


def test_a_sweeper_that_saw_none_of_an_outage_leaves_the_lapsed_leases_to_their_workers(
        worker_env: dict[str, str], own_redis: RedisServer, fake: FakeUpstream,
        spawn: Spawn, model: str, figures: Figures, workdir: Path) -> None:
    """Redis down longer than the leases and the sweeper role; its holder, stopped, cannot
    renew its leases when Redis is back, and the other worker, which saw none of the outage
    as it did not sweep, takes the role. Its sweep notes the lapses in the records and waits a
    lease period: the first worker, going on, renews them, and no call is made twice."""
    config = workdir / f"redis-faults-{uuid.uuid4().hex[:6]}.yaml"
    config.write_text(yaml.safe_dump({  # 3 s leases: a renewal a second
        "worker": {"lease_ttl": 3, "reap_interval": 0.5, "watchdog_interval": 0.2},
        "upstreams": [{"name": "fake", "base_url": fake.base_url,
                       "timeouts": {"connect": 2, "read": 60, "total": 90}}]}))
    env = {**worker_env, "REDIS_URL": own_redis.url, "API_TASKS_CONFIG": str(config)}
    own_redis.start()
    check = redis.Redis.from_url(own_redis.url)
    client = Client(load_settings(env=env))

    def sweeping(worker: WorkerProcess) -> bool:  # the role holds its holder's worker id
        return f".{worker.pid}.".encode() in (check.get(client.keys.sweeper()) or b"")
    fake.script(model, Reply(delay=20.0))  # calls in flight all through the outage
    first = spawn(env, "first", concurrency=5)
    wait_until(lambda: sweeping(first), 10, "the first worker to sweep")
    second = spawn(env, "second", concurrency=5)
    jobs = [client.submit_chat(USER, model=model) for _ in range(10)]
    fake.wait_for_requests(model, 10, timeout=20)  # five calls in flight in each worker
    own_redis.stop(crash=True)
    started = time.monotonic()
    time.sleep(10.0)  # the outage itself: past the role's 9 s and the 3 s leases
    first.signal(signal.SIGSTOP)
    try:
        own_redis.start()
        wait_until(lambda: sweeping(second), 20, "the second worker to take the role")
        # (a sweep that took them at once would say so in its log)
        wait_until(lambda: any(check.hget(client.keys.job(job.id), "lapse_seen")
                               for job in jobs) or "lost its worker" in second.log(), 10,
                   "a sweep to see the first's leases lapsed")
    finally:
        first.signal(signal.SIGCONT)
    for job in jobs:
        assert job.result(timeout=60) is not None
    counted = outcomes(lambda: [first.log(), second.log()], [job.id for job in jobs])
    assert counted == [1] * 10
    repeated = len(fake.requests(model)) - 10
    assert repeated == 0, "a job whose worker was alive was taken from it"
    assert "lost its worker" not in second.log()
    figures.add("Redis killed for 10 s (past the leases and the sweeper role), 10 jobs running "
                "on two workers; the role's holder stopped as it comes back, the other takes "
                "the role", 10, counted.count(0), 0, repeated, time.monotonic() - started)


def test_worker_started_before_redis_waits_then_consumes(
        env: dict[str, str], own_redis: RedisServer,
        spawn: Spawn, model: str, figures: Figures) -> None:
    early = spawn(env, "early", concurrency=4, wait=False)
    wait_until(lambda: "waiting for Redis" in early.log(), 30, "the worker to say it waits")
    assert early.proc is not None and early.proc.poll() is None
    own_redis.start()
    up = time.monotonic()
    client = Client(load_settings(env=env))
    assert client.submit_chat(USER, model=model).result(timeout=30) is not None
    assert time.monotonic() - up < 10
    assert early.proc.poll() is None
    figures.add("Redis down when the worker starts (job done after Redis came up)", 1, 0, 0, 0,
                time.monotonic() - up)


def test_a_message_popped_as_redis_goes_away_is_put_back_and_runs_once(
        env: dict[str, str], own_redis: RedisServer, fake: FakeUpstream,
        spawn: Spawn, model: str, figures: Figures) -> None:
    """kombu pops a message, then writes its unacked entry: Redis lost in between would lose
    the message. The worker keeps it and puts it back once Redis answers."""
    own_redis.start()
    proxy = TcpProxy(own_redis.port).start()
    try:
        worker = spawn({**env, "REDIS_URL": proxy.url}, "popped", concurrency=2)
        proxy.trip_after_reply(b"BRPOP", outage=3.0)
        client = Client(load_settings(env=env))  # the producer reaches Redis itself
        job = client.submit_chat(USER, model=model)
        assert proxy.tripped.wait(10)
        started = time.monotonic()
        assert job.result(timeout=60) is not None
        assert "put back 1 message(s) popped as Redis went away" in worker.log()
        counted = outcomes(lambda: [worker.log()], [job.id])
        assert counted == [1] and len(fake.requests(model)) == 1
    finally:
        proxy.stop()
    figures.add("Redis lost between kombu's BRPOP of a message and its unacked entry "
                "(3 s outage)", 1, counted.count(0), 0, 0, time.monotonic() - started)
