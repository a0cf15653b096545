"""Redis Sentinel: the primary dies under load, Sentinel promotes the replica, and workers,
producers and the gateway follow it without a restart."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
import yaml

from api_tasks import BrokerUnavailable, StreamRestarted
from api_tasks.client import Client
from api_tasks.record.reader import Job
from config.loader import load_settings
from tests.conftest import GATEWAY_KEY, start_gateway
from tests.support.fake_upstream import FakeUpstream, Reply
from tests.support.figures import Figures, outcomes
from tests.support.job_events import FINAL, iter_events
from tests.support.services import SentinelGroup, Spawn, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(300)]
USER = [{"role": "user", "content": "Hello"}]
PIECES = [f"w{i} " for i in range(20)]
TEXT = "".join(PIECES)
BEFORE, AFTER = 300, 100


@pytest.fixture
def group(workdir: Path) -> Iterator[SentinelGroup]:
    sentinels = SentinelGroup(workdir / f"sentinel-{uuid.uuid4().hex[:6]}")
    yield sentinels.start()
    sentinels.stop()


@pytest.fixture
def env(worker_env: dict[str, str], group: SentinelGroup, workdir: Path,
        fake: FakeUpstream) -> dict[str, str]:
    """The default settings but the upstream and the gateway's key; Redis by Sentinel."""
    config = workdir / f"sentinel-{uuid.uuid4().hex[:6]}.yaml"
    config.write_text(yaml.safe_dump({
        "upstreams": [{"name": "fake", "base_url": fake.base_url}],
        "gateway": {"keys": [{"name": "main", "key_env": "GW_MAIN_KEY"}]}}))
    return {**worker_env, "REDIS_URL": group.url, "API_TASKS_CONFIG": str(config)}


def _text(job: Job) -> str:
    response = job.result(timeout=120)
    assert response is not None
    return str(response["choices"][0]["message"]["content"])


class _Submitter(threading.Thread):
    """Submits a job every 20 ms until stopped, keeping what was accepted and what failed."""

    def __init__(self, client: Client, model: str) -> None:
        super().__init__(daemon=True)
        self.client, self.model = client, model
        self.accepted: list[tuple[float, Job]] = []
        self.refused: list[float] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.02):
            try:
                job = self.client.submit_chat(USER, model=self.model,
                                              stream=len(self.accepted) % 2 == 0)
            except BrokerUnavailable:
                self.refused.append(time.monotonic())
            else:
                self.accepted.append((time.monotonic(), job))


def _follow(job: Job, seen: list[str]) -> None:
    """Read a stream live across the failover: a reader whose Redis went away reads again
    (the stream replays), one told of a restart starts over."""
    while True:
        text = ""
        try:
            for chunk in job.stream(timeout=120):
                text += "".join((choice.get("delta") or {}).get("content") or ""
                                for choice in chunk.get("choices") or [])
        except StreamRestarted:
            continue
        except BrokerUnavailable:
            time.sleep(0.1)  # a poll: Sentinel is choosing the new primary
            continue
        seen.append(text)
        return


def _follow_sse(url: str, seen: list[dict[str, Any]], cuts: list[str]) -> None:
    """Read a job's events from the gateway, resuming after ``Last-Event-ID`` whenever the
    connection ends before the final event (as a browser's EventSource does)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        headers = {"Authorization": f"Bearer {GATEWAY_KEY}"}
        if seen:
            headers["Last-Event-ID"] = seen[-1]["id"]
        try:
            with httpx.stream("GET", url, headers=headers, timeout=30) as response:
                if response.status_code != 200:  # 503 while Redis has no primary
                    cuts.append(str(response.status_code))
                    time.sleep(0.1)
                    continue
                for event in iter_events(response):
                    seen.append(event)
                    if event["type"] in FINAL:
                        return
        except httpx.HTTPError as err:
            cuts.append(type(err).__name__)
        cuts.append("ended")
        time.sleep(0.1)  # EventSource waits a moment before it reconnects


def test_primary_killed_under_load_sentinel_promotes_and_every_job_ends_once(
        env: dict[str, str], group: SentinelGroup, fake: FakeUpstream, spawn: Spawn,
        model: str, workdir: Path, figures: Figures) -> None:
    fake.script(model, Reply(pieces=PIECES, chunk_delay=0.1, delay=0.5))
    followed = f"{model}-sse"  # the gateway's reader follows a 20 s stream: cut mid-way
    fake.script(followed, Reply(pieces=PIECES, chunk_delay=1.0))
    spawn(env, "sentinel-w", concurrency=200)  # the default concurrency
    gateway = start_gateway(env, workdir, f"sentinel-gw-{model}")
    try:
        client = Client(load_settings(env=env))
        created = httpx.post(gateway.url + "/v1/jobs", headers={
            "Authorization": f"Bearer {GATEWAY_KEY}"}, json={
            "url": "/v1/chat/completions",
            "body": {"model": followed, "messages": USER, "stream": True}})
        assert created.status_code == 202
        sse: list[dict[str, Any]] = []
        cuts: list[str] = []
        follower = threading.Thread(target=_follow_sse, daemon=True, args=(
            f"{gateway.url}/v1/jobs/{created.json()['id']}/events", sse, cuts))
        follower.start()
        before = [client.submit_chat(USER, model=model, stream=i % 2 == 0)
                  for i in range(BEFORE)]
        seen: list[str] = []
        readers = [threading.Thread(target=_follow, args=(job, seen), daemon=True)
                   for job in before[:20:2]]
        for reader in readers:
            reader.start()
        submitter = _Submitter(client, model)
        submitter.start()
        fake.wait_for_requests(model, 200, timeout=60)  # every slot busy, 100 jobs queued

        # Crash the primary once the replica holds everything it acknowledged, so the test
        # measures the project, not Redis's asynchronous replication (RELIABILITY.md)
        group.pause_until_replicated()
        group.primary.stop(crash=True)
        crashed = time.monotonic()
        wait_until(lambda: group.primary_port() == group.replica.port, 30,
                   "Sentinel to promote the replica")
        promoted = time.monotonic() - crashed
        wait_until(lambda: any(at > crashed for at, _ in submitter.accepted), 30,
                   "a producer's submit to succeed on the new primary")
        producer_back = min(at for at, _ in submitter.accepted if at > crashed) - crashed
        group.primary.start()  # the old primary comes back, and Sentinel makes it a replica
        after = [client.submit_chat(USER, model=model, stream=i % 2 == 0)
                 for i in range(AFTER)]
        submitter.halt.set()
        submitter.join(10)
        during = [job for _, job in submitter.accepted]

        jobs = before + during + after
        texts = [_text(job) for job in jobs]
        recovered_in = time.monotonic() - crashed
        assert texts == [TEXT] * len(jobs)
        for reader in readers:
            reader.join(60)
        assert seen == [TEXT] * len(readers)  # live readers got every chunk, or started over
        follower.join(60)
        # through the gateway too: resumed after the last event id, no gap and no repeat
        # (a new attempt would open with a reset: the reader keeps what follows the last one)
        last = max((i for i, e in enumerate(sse) if e["type"] == "reset"), default=-1)
        chunks = [e for e in sse[last + 1:] if e["type"] == "chunk"]
        assert [e["seq"] for e in chunks] == list(range(len(chunks))), cuts
        assert "".join(c["delta"].get("content") or "" for e in chunks
                       for c in e["data"]["choices"]) == TEXT
        assert sse[-1]["type"] == "done" and cuts  # the failover did cut it off

        primary = redis.Redis(port=group.replica.port)
        for job in jobs:  # one final event per job, on the promoted primary
            finals = [kind for _, fields in primary.xrange(client.keys.events(job.id))
                      if (kind := json.loads(fields[b"event"])["type"]) in FINAL]
            assert finals == ["done"], job.id
        counted = outcomes(spawn.logs, [job.id for job in jobs], timeout=30)
        assert counted == [1] * len(jobs)

        # the gateway follows too: ready again, and an SDK call goes through the new primary
        wait_until(lambda: httpx.get(gateway.url + "/readyz").status_code == 200, 30,
                   "the gateway to be ready on the new primary")
        sdk = openai.OpenAI(base_url=gateway.url + "/v1", api_key=GATEWAY_KEY, max_retries=0,
                            timeout=60)
        reply = sdk.chat.completions.create(model=model, messages=USER)  # type: ignore[arg-type]
        assert reply.choices[0].message.content == TEXT
        wait_until(lambda: group.role(group.primary.port) == "slave", 30,
                   "the old primary to rejoin as a replica")
    finally:
        gateway.stop()
    figures.add(f"Redis primary SIGKILLed under Sentinel ({BEFORE} jobs in flight, "
                f"{len(during)} submitted during the failover, {AFTER} after; promoted in "
                f"{promoted:.1f} s, producers back in {producer_back:.1f} s)", len(jobs),
                counted.count(0), sum(n - 1 for n in counted if n > 1),
                len(fake.requests(model)) - len(jobs) - 1, recovered_in)  # less the SDK's


def test_the_state_on_a_sentinel_url_of_its_own_follows_the_failover_too(
        env: dict[str, str], group: SentinelGroup, fake: FakeUpstream, spawn: Spawn,
        model: str) -> None:
    # the broker on database 0, the state (records, results, streams) on database 1, each
    # by its own sentinel:// URL: both connections must follow the promotion
    apart = {**env, "REDIS_STATE_URL": group.url.rsplit("/", 1)[0] + "/1"}
    fake.script(model, Reply(pieces=PIECES, chunk_delay=0.05, delay=0.5))
    spawn(apart, "sentinel-state", concurrency=16)
    client = Client(load_settings(env=apart))
    assert client.apart
    before = [client.submit_chat(USER, model=model, stream=i % 2 == 0) for i in range(40)]
    fake.wait_for_requests(model, 16, timeout=30)
    group.pause_until_replicated()
    group.primary.stop(crash=True)
    wait_until(lambda: group.primary_port() == group.replica.port, 30,
               "Sentinel to promote the replica")

    def submitted() -> Job | None:
        try:
            return client.submit_chat(USER, model=model, stream=True)
        except BrokerUnavailable:
            return None
    after = [wait_until(submitted, 30, "a submit on the new primary", interval=0.2)
             for _ in range(10)]
    jobs = before + after
    assert [_text(job) for job in jobs] == [TEXT] * len(jobs)
    promoted = redis.Redis(port=group.replica.port, db=1)
    for job in jobs:  # one final event per job, on the state's database of the new primary
        finals = [kind for _, fields in promoted.xrange(client.keys.events(job.id))
                  if (kind := json.loads(fields[b"event"])["type"]) in FINAL]
        assert finals == ["done"], job.id
    assert not redis.Redis(port=group.replica.port, db=0).exists(client.keys.job(jobs[0].id))
    assert outcomes(spawn.logs, [job.id for job in jobs], timeout=30) == [1] * len(jobs)
