"""Runaway upstreams at load: what a stream may hold in Redis and the worker's memory stay
bounded, and each runaway job fails clearly."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
import redis
import yaml

from api_tasks import JobFailed
from api_tasks.client import Client
from config.loader import load_settings
from tests.support.fake_upstream import Endless, FakeUpstream
from tests.support.figures import Figures
from tests.support.services import Spawn

pytestmark = [pytest.mark.integration, pytest.mark.faults]
USER = [{"role": "user", "content": "Hello"}]
RUNAWAYS = 50
CAP = 4 * 1024 * 1024  # jobs.max_stream_bytes here: 50 x 32 MiB (the default) is slow to make


def _rss_mb(pid: int, field: str) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines()
                    if line.startswith(field + ":"))) / 1024


def test_50_runaway_streams_at_once_are_cut_at_the_cap(
        worker_env: dict[str, str], workdir: Path, fake: FakeUpstream, spawn: Spawn,
        redis_client: redis.Redis, model: str, figures: Figures) -> None:
    config = workdir / f"runaway-{uuid.uuid4().hex[:6]}.yaml"
    config.write_text(yaml.safe_dump({
        "jobs": {"max_stream_bytes": CAP},
        "upstreams": [{"name": "fake", "base_url": fake.base_url,
                       "timeouts": {"connect": 5, "read": 60, "total": 300}}]}))
    env = {**worker_env, "API_TASKS_CONFIG": str(config), "API_TASKS_LOG_LEVEL": "INFO",
           "API_TASKS_PREFIX": f"run{uuid.uuid4().hex[:6]}"}
    client = Client(load_settings(env=env))
    fake.script(model, Endless())
    worker = spawn(env, "runaway", concurrency=200)  # the default concurrency
    idle_rss = _rss_mb(worker.pid, "VmRSS")
    redis_before = int(redis_client.info("memory")["used_memory"])
    started = time.monotonic()
    jobs = [client.submit_chat(USER, model=model, stream=True) for _ in range(RUNAWAYS)]
    for job in jobs:
        with pytest.raises(JobFailed) as caught:
            job.result(timeout=180)
        assert caught.value.error["code"] == "stream_too_large"
        assert "jobs.max_stream_bytes" in caught.value.error["message"]
    took = time.monotonic() - started
    peak_rss = _rss_mb(worker.pid, "VmHWM")
    stored = [sum(len(fields[b"event"]) for _, fields in redis_client.xrange(
        client.keys.events(job.id))) for job in jobs]
    redis_grew = (int(redis_client.info("memory")["used_memory"]) - redis_before) / 2**20
    assert max(stored) <= CAP + 4096  # the chunks kept, plus the final error event
    assert min(stored) > CAP * 0.9  # each ran right up to the cap
    assert redis_grew < RUNAWAYS * CAP * 2 / 2**20  # entries cost at most twice their bytes
    assert peak_rss - idle_rss < 400, f"worker RSS {idle_rss:.0f} -> peak {peak_rss:.0f} MB"
    assert len(fake.requests(model)) == RUNAWAYS  # a cut stream is not called again
    figures.add(f"{RUNAWAYS} runaway streams at once, max_stream_bytes {CAP >> 20} MiB "
                f"(worker RSS {idle_rss:.0f} -> peak {peak_rss:.0f} MB; Redis +{redis_grew:.0f} "
                f"MB)", RUNAWAYS, 0, 0, 0, took)
