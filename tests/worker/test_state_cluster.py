"""The project's state on a Redis Cluster of 3 primaries (``redis+cluster://``), the broker on
a plain Redis: a primary's death stops only the jobs of the shards it serves, and they end
once when it is back (``scripts/test`` runs the core and fault tests on such a cluster too)."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from redis.cluster import RedisCluster

from api_tasks.client import Client
from api_tasks.errors import BrokerUnavailable
from config.loader import load_settings
from tests.support.fake_upstream import FakeUpstream, Reply
from tests.support.figures import Figures, outcomes
from tests.support.services import RedisClusterGroup, RedisServer, Spawn

pytestmark = [pytest.mark.integration, pytest.mark.faults]
USER = [{"role": "user", "content": "Hello"}]
PIECES = [f"w{n} " for n in range(10)]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisClusterGroup]:
    group = RedisClusterGroup(tmp_path / "cluster", persist=True).start()
    yield group
    group.stop()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "broker").start()
    yield server
    server.stop()


def test_a_dead_primary_stops_only_its_shards_jobs_and_they_end_once_when_it_is_back(
        worker_env: dict[str, str], cluster: RedisClusterGroup, broker: RedisServer,
        fake: FakeUpstream, spawn: Spawn, model: str, figures: Figures, tmp_path: Path) -> None:
    config = tmp_path / "cluster.yaml"  # leases shorter than the outage: renewed meanwhile
    given = yaml.safe_load(Path(worker_env["API_TASKS_CONFIG"]).read_text())
    # (3 s: a renewal every second, so a busy machine's pause of a second or two loses none)
    given["worker"] = {**given.get("worker", {}), "lease_ttl": 3, "reap_interval": 0.5}
    config.write_text(yaml.safe_dump(given))
    env = {**worker_env, "REDIS_URL": broker.url, "REDIS_STATE_URL": cluster.cluster_url,
           "API_TASKS_REDIS_SHARDS": "12", "API_TASKS_PREFIX": f"cl{uuid.uuid4().hex[:6]}",
           "API_TASKS_CONFIG": str(config)}
    fake.script(model, Reply(pieces=PIECES, delay=7))  # calls longer than two leases
    worker = spawn(env, "sharded", concurrency=200)  # the default
    client = Client(load_settings(env=env))
    jobs = [client.submit_chat([{"role": "user", "content": f"job {n}"}], model=model,
                               stream=n % 4 == 0) for n in range(200)]
    fake.wait_for_requests(model, 200, timeout=30)  # every one in flight
    nodes = RedisCluster.from_url(cluster.url)
    # a node without the sweeper role's key (whose loss moves the sweeping to a stand-in:
    # test_sweeper), so that the reaper runs all along and would run again any job whose
    # lease lapsed
    sweeping = int(nodes.get_node_from_key(client.keys.sweeper()).port)
    victim = next(node for node in cluster.nodes if node.port != sweeping)

    def on_victim(job_id: str) -> bool:
        return int(nodes.get_node_from_key(client.keys.job(job_id)).port) == victim.port

    stranded = {job.id for job in jobs if on_victim(job.id)}
    assert 0 < len(stranded) < len(jobs)
    victim.stop(crash=True)
    killed = time.monotonic()
    for job in jobs:  # every other shard's job ends while the primary is down
        if job.id not in stranded:
            assert _text(job.result(timeout=60)) == "".join(PIECES)
    refused = went = 0
    for _ in range(30):  # a submit to one of its shards says so; the others go
        try:
            jobs.append(client.submit_chat(USER, model=model))
            went += 1
        except BrokerUnavailable:
            refused += 1
    assert refused and went
    for job in [job for job in jobs if job.id in stranded][:5]:
        with pytest.raises(BrokerUnavailable):  # its record is out of reach: said so, at once
            job.status()
    victim.start()
    cluster.wait_ready()  # until then, a reader of its shards is told Redis is unavailable
    for job in jobs:
        assert _text(job.result(timeout=90)) == "".join(PIECES)
    recovered = time.monotonic() - killed
    for job in jobs[:200:4]:  # a stream replays whole, across the outage too
        assert "".join(job.text_stream(timeout=10)) == "".join(PIECES)
    ended = outcomes(lambda: [worker.log()], [job.id for job in jobs])
    assert ended == [1] * len(jobs)
    calls = Counter(str(r.body["messages"][-1]["content"]) for r in fake.requests(model)
                    if r.body is not None)
    for n, job in enumerate(jobs[:200]):  # the others' leases held through the outage
        assert calls[f"job {n}"] == 1 or job.id in stranded, (n, calls[f"job {n}"])
    repeated = sum(calls.values()) - len(jobs)
    # its shards' jobs too: their worker took back the leases that lapsed while the primary
    # was down, before the reaper would give them back
    assert repeated == 0, repeated
    figures.add(f"a primary of the state's Redis Cluster SIGKILLed (1 of 3, 12 shards, no "
                f"replica), 200 jobs in flight, {len(stranded)} of them in its shards; restarted "
                "after the others' jobs ended", len(jobs), 0, 0, repeated, recovered)


def _text(result: dict[str, Any] | None) -> str:
    assert result is not None
    return str(result["choices"][0]["message"]["content"])
