"""The broker and the project's state on two Redis servers (``redis.state_url``): queues and
unacked messages on one, records, results, streams, leases, limits and batches on the other,
with the guarantees kept (``scripts/test`` also runs the core and fault tests so)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import yaml

from api_tasks.client import Client
from api_tasks.enqueue import _joined, _outcome, _unknown
from api_tasks.errors import BrokerUnavailable
from api_tasks.record.calls import Failed
from config.loader import load_settings
from tests.support.fake_upstream import FakeUpstream, Reply
from tests.support.figures import outcomes
from tests.support.services import ROOT, RedisServer, Spawn, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.faults]
USER = [{"role": "user", "content": "Hello"}]


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer]]:
    broker = RedisServer(tmp_path / "broker").start()
    state = RedisServer(tmp_path / "state").start()
    yield broker, state
    state.stop()
    broker.stop()


@pytest.fixture
def env(worker_env: dict[str, str], tmp_path: Path, fake: FakeUpstream,
        servers: tuple[RedisServer, RedisServer]) -> dict[str, str]:
    """Short leases; one model under a limit of 2 calls a second."""
    config = tmp_path / "apart.yaml"
    config.write_text(yaml.safe_dump({
        "worker": {"lease_ttl": 2, "reap_interval": 0.5, "watchdog_interval": 0.2,
                   "reserve_ahead": 0.2},
        "upstreams": [{"name": "paced", "base_url": fake.base_url, "models": ["paced-*"],
                       "limits": {"requests_per_minute": 120, "burst_seconds": 1,
                                  "utilization": 1.0}},
                      {"name": "fake", "base_url": fake.base_url,
                       "timeouts": {"connect": 2, "read": 30, "total": 60}}]}))
    broker, state = servers
    return {**worker_env, "API_TASKS_CONFIG": str(config), "REDIS_URL": broker.url,
            "REDIS_STATE_URL": state.url, "API_TASKS_PREFIX": f"ap{uuid.uuid4().hex[:6]}"}


def _keys(server: RedisServer) -> set[str]:
    return {key.decode() for key in redis.Redis.from_url(server.url).scan_iter(count=1000)}


def test_jobs_streams_limits_and_batches_run_with_the_broker_and_the_state_apart(
        env: dict[str, str], servers: tuple[RedisServer, RedisServer], fake: FakeUpstream,
        spawn: Spawn, model: str, tmp_path: Path) -> None:
    broker, state = servers
    spawn(env, "apart", concurrency=8)
    client = Client(load_settings(env=env))
    plain = client.submit_chat(USER, model=model)
    streamed = client.submit_chat(USER, model=model, stream=True)
    paced = [client.submit_chat(USER, model="paced-" + model, queue="bulk") for _ in range(6)]
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": USER}}
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps(line) + "\n")
    batch = client.submit_batch(source, window=1)
    assert plain.result(timeout=30) is not None
    assert "".join(streamed.text_stream(timeout=30))  # replayed from the state's stream
    for job in paced:  # past the burst, they waited outside the worker and were sent again
        assert job.result(timeout=30) is not None
    assert batch.wait(timeout=30)["status"] == "completed"
    calls = sorted(r.at for r in fake.requests("paced-" + model))
    assert calls[-1] - calls[0] >= 1.5  # 6 calls at 2 a second, 2 at once
    prefix = client.keys.prefix
    on_broker, on_state = _keys(broker), _keys(state)
    assert on_broker and all(key.startswith(f"{prefix}:celery:") for key in on_broker)
    assert not any(key.startswith(f"{prefix}:celery:") for key in on_state)
    for job in (plain, streamed, *paced):
        assert client.keys.job(job.id) in on_state and client.keys.result(job.id) in on_state
    assert client.keys.events(streamed.id) in on_state


def test_a_dead_workers_jobs_come_back_across_the_two_servers(
        env: dict[str, str], servers: tuple[RedisServer, RedisServer], fake: FakeUpstream,
        spawn: Spawn, model: str) -> None:
    """The reaper reads the unacked messages on the broker's Redis, takes each job back in
    the state's, and returns its message: each job ends once."""
    fake.script(model, Reply(delay=30))  # the doomed worker's calls never come back
    doomed = spawn(env, "doomed", concurrency=20)
    client = Client(load_settings(env=env))
    jobs = [client.submit_chat(USER, model=model, stream=i % 2 == 0) for i in range(20)]
    fake.wait_for_requests(model, 20, timeout=20)
    fake.script(model, Reply(content="recovered"))
    doomed.kill()
    heir = spawn(env, "heir", concurrency=20)
    for job in jobs:
        response = job.result(timeout=60)
        assert response is not None and response["choices"][0]["message"]["content"] == "recovered"
    assert outcomes(lambda: [heir.log(), doomed.log()], [job.id for job in jobs]) == [1] * 20
    assert all(job.info()["crashes"] == "1" for job in jobs)


def test_health_needs_both_servers(env: dict[str, str],
                                   servers: tuple[RedisServer, RedisServer],
                                   spawn: Spawn) -> None:
    broker, _ = servers
    spawn(env, "probed", concurrency=2)

    def health() -> int:
        return subprocess.run([sys.executable, "-m", "api_tasks", "health"], cwd=ROOT,
                              env=env, capture_output=True, timeout=60).returncode
    assert health() == 0
    broker.stop()
    started = time.monotonic()
    assert health() != 0
    assert time.monotonic() - started < 30
    broker.start()
    wait_until(lambda: health() == 0, 30, "healthy again")


def test_a_message_that_may_have_gone_keeps_its_record_and_a_refused_one_does_not() -> None:
    """Apart, a submit's message goes after its record: refused by the broker, the record is
    taken back out; lost on the way (it may have gone), the record stays, or the worker would
    run the job on a bare record of its own."""
    lost = redis.TimeoutError("Timeout reading from the broker")
    [maybe] = _joined([[1]], [_unknown(lost)])
    error, orphaned = _outcome(maybe)
    assert isinstance(error, BrokerUnavailable) and not orphaned
    refusal = redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind")
    [refused] = _joined([[1]], [Failed(refusal, [refusal])])
    error, orphaned = _outcome(refused)
    assert error is refusal and orphaned


def test_a_submit_is_one_script_on_one_redis_and_two_steps_apart(
        worker_env: dict[str, str], servers: tuple[RedisServer, RedisServer]) -> None:
    """No worker here: just what a submit sends. On one Redis, a job is one script (no
    transaction); apart, the record's script on the state (a transaction only for several
    jobs at once), then the message's script on the broker."""
    broker, state = servers
    prefix = f"sub{uuid.uuid4().hex[:6]}"

    def commands(server: RedisServer) -> dict[str, int]:
        stats = redis.Redis.from_url(server.url).info("commandstats")
        return {name.removeprefix("cmdstat_"): int(s["calls"]) for name, s in stats.items()
                if name in ("cmdstat_evalsha", "cmdstat_multi", "cmdstat_exec", "cmdstat_lpush")}

    one = Client(load_settings(env={**worker_env, "REDIS_URL": broker.url,
                                    "API_TASKS_PREFIX": prefix}))
    one.warm()
    redis.Redis.from_url(broker.url).config_resetstat()
    one.submit_chat(USER, model="m-one")
    assert commands(broker) == {"evalsha": 1, "lpush": 1}
    apart = Client(load_settings(env={**worker_env, "REDIS_URL": broker.url,
                                      "REDIS_STATE_URL": state.url, "API_TASKS_PREFIX": prefix}))
    apart.warm()
    for server in servers:
        redis.Redis.from_url(server.url).config_resetstat()
    apart.submit_chat(USER, model="m-apart")
    assert commands(state) == {"evalsha": 1}
    assert commands(broker) == {"evalsha": 1, "lpush": 1}
