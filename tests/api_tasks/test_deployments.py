"""Model groups of several deployments: routing by room, fallbacks within a job, breakers.

Real workers and Redis; each deployment is its own fake upstream, so where each call went
is counted by the server that took it.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from api_tasks import JobFailed
from api_tasks.client import Client
from config.errors import ConfigError
from config.loader import load_settings
from tests.support.fake_upstream import FakeUpstream, HttpError, Reply
from tests.support.scrape import metrics_ports, scrape, value
from tests.support.services import WorkerProcess, free_port, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.faults]
USER = [{"role": "user", "content": "Hello"}]
ROOT = Path(__file__).resolve().parents[2]
BREAKER = {"failures": 3, "window": 60, "cooldown": 2}
QUICK = {"initial_delay": 0.05, "max_delay": 0.2, "max_retry_after": 3}


@dataclass
class Cluster:
    """A worker with its settings, the deployments' servers and a client."""

    env: dict[str, str]
    client: Client
    servers: dict[str, FakeUpstream]
    dead_port: int
    worker: WorkerProcess


def _settings(servers: dict[str, FakeUpstream], dead_port: int,
              fallback_url: str) -> dict[str, Any]:
    url = {name: server.base_url for name, server in servers.items()}
    timeouts = {"connect": 2, "read": 10, "total": 20}
    return {
        "worker": {"lease_ttl": 3, "watchdog_interval": 0.2, "reserve_ahead": 1.0},
        "fallbacks": {"fbp-model": ["fbs-model"]},
        "upstreams": [
            {"name": "pair", "models": ["pair-*"], "retry": QUICK, "timeouts": timeouts,
             "breaker": BREAKER, "deployments": [
                 {"name": "pair-a", "base_url": url["a"], "weight": 3},
                 {"name": "pair-b", "base_url": url["b"] + "/v1", "weight": 1}]},
            {"name": "flaky", "models": ["flaky-*"], "retry": QUICK, "timeouts": timeouts,
             "breaker": BREAKER, "deployments": [
                 {"name": "flaky-dead", "base_url": f"http://127.0.0.1:{dead_port}"},
                 {"name": "flaky-live", "base_url": url["c"]}]},
            {"name": "paced", "models": ["paced-*"], "retry": QUICK, "timeouts": timeouts,
             "deployments": [
                 {"name": "paced-a", "base_url": url["a"], "limits": {
                     "requests_per_minute": 120, "utilization": 1.0, "burst_seconds": 0.01}},
                 {"name": "paced-b", "base_url": url["b"], "limits": {
                     "requests_per_minute": 120, "utilization": 1.0, "burst_seconds": 0.01}}]},
            {"name": "sized", "models": ["sized-*"], "retry": QUICK, "timeouts": timeouts,
             "deployments": [
                 {"name": "sized-small", "base_url": url["a"],
                  "limits": {"tokens_per_minute": 300}},
                 {"name": "sized-big", "base_url": url["b"]}]},
            {"name": "learnt", "models": ["learnt-*"], "retry": QUICK, "timeouts": timeouts,
             "deployments": [
                 {"name": "learnt-a", "base_url": url["a"], "weight": 100, "limits": "auto"},
                 {"name": "learnt-b", "base_url": url["b"], "limits": "auto"}]},
            {"name": "primary", "base_url": url["c"], "models": ["fbp-*"], "retry": QUICK,
             "timeouts": timeouts},
            {"name": "second", "base_url": fallback_url, "models": ["fbs-*"], "retry": QUICK,
             "timeouts": timeouts},
        ]}


@pytest.fixture(scope="module")
def cluster(worker_env: dict[str, str], workdir: Path, fake: FakeUpstream
            ) -> Iterator[Cluster]:
    servers = {name: FakeUpstream().start() for name in "abc"}
    dead_port = free_port()
    config = workdir / f"deployments-{uuid.uuid4().hex[:6]}.yaml"
    config.write_text(yaml.safe_dump(_settings(servers, dead_port, fake.base_url)))
    env = {**worker_env, "API_TASKS_CONFIG": str(config),
           "API_TASKS_PREFIX": f"dep{uuid.uuid4().hex[:6]}"}
    worker = WorkerProcess(env, workdir / f"deployments-{uuid.uuid4().hex[:6]}.log",
                           concurrency=8, name="deployments").start()
    try:
        yield Cluster(env, Client(load_settings(env=env)), servers, dead_port, worker)
    finally:
        worker.stop()
        for server in servers.values():
            server.stop()


def _tries(cluster: Cluster, job_id: str) -> list[dict[str, Any]]:
    return cluster.client.get_job(job_id).describe()["tries"]


def test_calls_spread_over_the_deployments_by_weight(cluster: Cluster) -> None:
    model = f"pair-{uuid.uuid4().hex[:8]}"
    for server in ("a", "b"):
        cluster.servers[server].script(model, Reply(content="ok", delay=0.02))
    jobs = [cluster.client.submit_chat(USER, model=model) for _ in range(120)]
    for job in jobs:
        job.result(timeout=60)
    served = Counter(_tries(cluster, job.id)[-1]["deployment"] for job in jobs)
    # what each server saw agrees with what the records say
    assert served["pair-a"] == len(cluster.servers["a"].requests(model))
    assert served["pair-b"] == len(cluster.servers["b"].requests(model))
    assert served["pair-a"] + served["pair-b"] == 120
    assert 0.6 <= served["pair-a"] / 120 <= 0.9  # weight 3 to 1: about three quarters


def _gauge(cluster: Cluster, name: str, deployment: str) -> float:
    """A deployment's cluster gauge, read from Redis at a scrape of the worker (it must be
    there: a missing one is not a zero)."""
    [port] = metrics_ports(cluster.client)
    samples = scrape(f"http://127.0.0.1:{port}/metrics")
    assert any(n == name and ("deployment", deployment) in labels for n, labels in samples)
    return value(samples, name, deployment=deployment)


def test_each_deployments_calls_in_flight_are_a_gauge(cluster: Cluster) -> None:
    model = f"pair-{uuid.uuid4().hex[:8]}"
    for server in ("a", "b"):
        cluster.servers[server].script(model, Reply(content="ok", delay=3.0))
    jobs = [cluster.client.submit_chat(USER, model=model) for _ in range(6)]

    def held() -> list[float]:
        return [_gauge(cluster, "api_tasks_deployment_calls_in_flight", name)
                for name in ("pair-a", "pair-b")]
    # each call is held 3 s upstream: the gauges are the calls each server holds
    wait_until(lambda: held() == [len(cluster.servers[s].requests(model)) for s in "ab"] and
               sum(held()) == 6, 10, "six calls in flight, where the servers have them")
    for job in jobs:
        job.result(timeout=30)
    wait_until(lambda: sum(held()) == 0, 10, "none in flight")


def test_a_failed_call_moves_to_the_other_deployment_at_once(cluster: Cluster) -> None:
    model = f"pair-{uuid.uuid4().hex[:8]}"
    for server in ("a", "b"):  # each fails its first call, then answers
        cluster.servers[server].script(model, HttpError(503), Reply(content="third time"))
    job = cluster.client.submit_chat(USER, model=model)
    answer = job.result(timeout=30)
    assert answer["choices"][0]["message"]["content"] == "third time"
    first, second, third = _tries(cluster, job.id)
    # the second call went to the deployment the job had not tried; both failed, so the
    # third went to either, after the backoff
    assert {first["deployment"], second["deployment"]} == {"pair-a", "pair-b"}
    assert first["error"]["status"] == second["error"]["status"] == 503
    assert third["error"] is None
    described = job.describe()
    assert described["deployment"] == third["deployment"] and described["calls"] == 3


def test_a_4xx_is_never_moved_to_another_deployment(cluster: Cluster) -> None:
    model = f"pair-{uuid.uuid4().hex[:8]}"
    for server in ("a", "b"):
        cluster.servers[server].script(model, HttpError(400, error={
            "message": "bad field", "type": "invalid_request_error", "param": "top_p"}))
    job = cluster.client.submit_chat(USER, model=model)
    with pytest.raises(JobFailed) as failed:
        job.result(timeout=30)
    assert failed.value.error["status"] == 400
    assert len(_tries(cluster, job.id)) == 1
    assert len(cluster.servers["a"].requests(model)) + \
        len(cluster.servers["b"].requests(model)) == 1


def test_a_refused_key_moves_to_another_deployment_then_stands(cluster: Cluster) -> None:
    quota = {"message": "You exceeded your current quota", "type": "insufficient_quota",
             "code": "insufficient_quota"}
    spent = f"pair-{uuid.uuid4().hex[:8]}"
    cluster.servers["a"].script(spent, HttpError(429, error=quota))
    cluster.servers["b"].script(spent, Reply(content="other key"))
    jobs = [cluster.client.submit_chat(USER, model=spent) for _ in range(12)]
    for job in jobs:  # one deployment's key is out of quota: the other's is not
        assert job.result(timeout=30)["choices"][0]["message"]["content"] == "other key"
        tries = _tries(cluster, job.id)
        assert tries[-1]["deployment"] == "pair-b"
        assert [t["error"]["code"] for t in tries[:-1]] in ([], ["insufficient_quota"])
    refused = f"pair-{uuid.uuid4().hex[:8]}"
    for server in ("a", "b"):
        cluster.servers[server].script(refused, HttpError(401, error={
            "message": "Incorrect API key provided", "type": "invalid_request_error",
            "code": "invalid_api_key"}))
    job = cluster.client.submit_chat(USER, model=refused)
    with pytest.raises(JobFailed) as failed:  # every deployment refused: that stands
        job.result(timeout=30)
    assert failed.value.error["status"] == 401
    assert sorted(t["deployment"] for t in _tries(cluster, job.id)) == ["pair-a", "pair-b"]


def test_a_call_too_big_for_one_deployment_goes_to_another(cluster: Cluster) -> None:
    model = f"sized-{uuid.uuid4().hex[:8]}"
    jobs = [cluster.client.submit_chat(USER, model=model, max_tokens=500) for _ in range(6)]
    for job in jobs:
        job.result(timeout=30)
        assert [t["deployment"] for t in _tries(cluster, job.id)] == ["sized-big"]
    assert not cluster.servers["a"].requests(model)


def test_a_stream_moves_only_before_its_first_chunk(cluster: Cluster) -> None:
    cut, refused = f"pair-{uuid.uuid4().hex[:8]}", f"pair-{uuid.uuid4().hex[:8]}"
    for server in ("a", "b"):
        cluster.servers[server].script(cut, Reply(content="one two three four",
                                                  truncate_after=2))
        cluster.servers[server].script(refused, HttpError(502), Reply(content="streamed"))
    broken = cluster.client.submit_chat(USER, model=cut, stream=True)
    with pytest.raises(JobFailed) as failed:
        broken.result(timeout=30)
    assert failed.value.error["code"] == "stream_truncated"
    assert len(_tries(cluster, broken.id)) == 1  # chunks were out: never sent elsewhere
    moved = cluster.client.submit_chat(USER, model=refused, stream=True)
    assert "".join(moved.text_stream(timeout=30)) == "streamed"
    first, second = _tries(cluster, moved.id)[:2]
    assert first["deployment"] != second["deployment"]


def test_a_dead_deployment_opens_its_breaker_and_gets_no_more_calls(cluster: Cluster) -> None:
    model = f"flaky-{uuid.uuid4().hex[:8]}"
    cluster.servers["c"].script(model, Reply(content="alive"))
    jobs = [cluster.client.submit_chat(USER, model=model) for _ in range(60)]
    for job in jobs:  # none fails: each call the dead one refused moved to the live one
        assert job.result(timeout=60)["choices"][0]["message"]["content"] == "alive"
    tries = [t for job in jobs for t in _tries(cluster, job.id)]
    dead = [t for t in tries if t["deployment"] == "flaky-dead"]
    # the breaker opens after 3 failures; calls already routed when it opened still fail
    # (at most one per worker thread), none after
    assert 3 <= len(dead) <= 3 + 8
    assert all(t["error"]["code"] == "connection_refused" for t in dead), dead
    asked = time.monotonic()  # open_for is as the status command saw it, a moment later
    states = {s["deployment"]: s for s in _status(cluster)}
    assert states["flaky-dead"]["breaker"] == "open"
    assert states["flaky-live"]["breaker"] == "closed"
    reopens = asked + states["flaky-dead"]["open_for"]  # no later than it really reopens
    # the cluster's gauge, read from Redis at a scrape: open, unless it may have reopened
    assert _gauge(cluster, "api_tasks_deployment_breaker_open", "flaky-dead") == 1 or \
        time.monotonic() >= reopens
    assert _gauge(cluster, "api_tasks_deployment_breaker_open", "flaky-live") == 0
    more = [cluster.client.submit_chat(USER, model=model) for _ in range(20)]
    for job in more:
        job.result(timeout=60)
    # nothing goes to it while it is open; once its cool-down ends, one probe at a time
    # (refused, so open again for another cool-down)
    late = time.monotonic() - reopens
    probes = 0 if late < 0 else 1 + int(late // BREAKER["cooldown"])
    sent = [t for job in more for t in _tries(cluster, job.id) if t["deployment"] == "flaky-dead"]
    assert len(sent) <= probes and all(t["error"]["code"] == "connection_refused" for t in sent)
    # the server comes back: after the cool-down one call probes it, and it closes
    revived = FakeUpstream(port=cluster.dead_port).start()
    try:
        revived.script(model, Reply(content="back"))

        def probed() -> bool:
            cluster.client.submit_chat(USER, model=model).result(timeout=30)
            return len(revived.requests(model)) > 0
        wait_until(probed, 30, "a probe call to the revived deployment", interval=0.2)
        wait_until(lambda: {s["deployment"]: s for s in _status(cluster)}["flaky-dead"][
            "breaker"] == "closed", 10, "the breaker to close")
    finally:
        revived.stop()


def _status(cluster: Cluster) -> list[dict[str, Any]]:
    done = subprocess.run([sys.executable, "-m", "api_tasks", "status", "--json"], cwd=ROOT,
                          env=cluster.env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    plain = subprocess.run([sys.executable, "-m", "api_tasks", "status"], cwd=ROOT,
                           env=cluster.env, capture_output=True, text=True, timeout=60)
    assert plain.returncode == 0 and "flaky/flaky-dead" in plain.stdout
    return json.loads(done.stdout)


def test_each_deployment_keeps_its_own_limit(cluster: Cluster) -> None:
    model = f"paced-{uuid.uuid4().hex[:8]}"
    for server in ("a", "b"):
        cluster.servers[server].script(model, Reply(content="ok"))
    jobs = [cluster.client.submit_chat(USER, model=model) for _ in range(12)]
    for job in jobs:
        job.result(timeout=60)
    for server in ("a", "b"):  # 120 a minute each: a call every half second at most
        times = sorted(r.at for r in cluster.servers[server].requests(model))
        assert len(times) >= 3
        assert min(b - a for a, b in itertools.pairwise(times)) >= 0.45
    # both took a share: together they went twice as fast as one could
    served = Counter(_tries(cluster, job.id)[-1]["deployment"] for job in jobs)
    assert served["paced-a"] >= 3 and served["paced-b"] >= 3


def test_a_deployment_that_learnt_a_low_limit_is_routed_around(cluster: Cluster) -> None:
    """Routing reads the limits a deployment learnt (per model) where the limiter keeps
    them: the favoured deployment, found to allow 2 calls a minute, is passed over."""
    model = f"learnt-{uuid.uuid4().hex[:8]}"
    cluster.servers["a"].script(model, Reply(content="a", headers={
        "x-ratelimit-limit-requests": "2", "x-ratelimit-remaining-requests": "1"}))
    cluster.servers["b"].script(model, Reply(content="b", headers={
        "x-ratelimit-limit-requests": "6000", "x-ratelimit-remaining-requests": "5999"}))
    started = time.monotonic()
    for _ in range(6):
        assert cluster.client.submit_chat(USER, model=model).result(timeout=20) is not None
    # weight 100 to 1 sends the first calls to a; once its limit is known (a call every
    # 30 s or more) the rest go to b at once instead of waiting for a's turn
    assert len(cluster.servers["a"].requests(model)) <= 2
    assert len(cluster.servers["b"].requests(model)) >= 4
    assert time.monotonic() - started < 15


def test_a_model_falls_back_to_another_and_says_so(cluster: Cluster, fake: FakeUpstream) -> None:
    cluster.servers["c"].script("fbp-model", HttpError(500))
    fake.script("fbs-model", Reply(content="from the fallback"))
    job = cluster.client.submit_chat(USER, model="fbp-model")
    result = job.result(timeout=30)
    assert result["choices"][0]["message"]["content"] == "from the fallback"
    first, second = _tries(cluster, job.id)
    assert (first["deployment"], first["model"], first["error"]["status"]) == \
        ("primary", "fbp-model", 500)
    assert (second["deployment"], second["model"], second["error"]) == \
        ("second", "fbs-model", None)
    envelope = json.loads(cluster.client.redis.get(cluster.client.keys.result(job.id)))
    assert envelope["deployment"] == "second" and envelope["upstream"] == "second"
    assert envelope["model"] == "fbp-model"  # what the job asked for; tries say what served


@pytest.mark.parametrize(("change", "named"), [
    ({"deployments": []}, "upstreams[0]"),
    ({"deployments": [{"name": "d", "base_url": "http://d", "weight": 0}]},
     "upstreams[0].deployments[0].weight"),
    ({"deployments": [{"name": "u", "base_url": "http://d"}]},
     "upstreams[0].deployments[0].name"),
    ({"base_url": "http://u", "deployments": [{"name": "d", "base_url": "http://d"}]},
     "upstreams[0]"),
])
def test_bad_deployments_stop_the_worker_naming_the_key(tmp_path: Path, change: dict[str, Any],
                                                        named: str) -> None:
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump({"upstreams": [{"name": "u", **change}]}))
    with pytest.raises(ConfigError) as refused:
        load_settings(env={}, path=str(path))
    assert named in str(refused.value) and "\n" not in str(refused.value)


def test_fallbacks_that_loop_stop_the_worker(tmp_path: Path) -> None:
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump({
        "upstreams": [{"name": "u", "base_url": "http://u"}],
        "fallbacks": {"gpt-4o": ["gpt-4o-mini"], "gpt-4o-mini": ["gpt-4o"]}}))
    done = subprocess.run([sys.executable, "-m", "celery", "-A", "worker", "worker"],
                          cwd=ROOT, env={"API_TASKS_CONFIG": str(path), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "fallbacks.gpt-4o" in lines[0] and "loop" in lines[0]
    assert "gpt-4o -> gpt-4o-mini -> gpt-4o" in lines[0]


def test_a_deployment_key_never_leaves_the_worker(tmp_path: Path) -> None:
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump({"upstreams": [{"name": "u", "deployments": [
        {"name": "d", "base_url": "http://d", "api_key_env": "DEP_KEY"}]}]}))
    settings = load_settings(env={"DEP_KEY": "sk-dep-secret"}, path=str(path))
    [deployment] = settings.upstreams[0].targets()
    assert deployment.api_key is not None
    assert deployment.api_key.get_secret_value() == "sk-dep-secret"
    assert "sk-dep-secret" not in settings.model_dump_json()
    assert load_settings(env={}, path=str(path)).missing_keys() == [
        "upstreams[0].deployments[0].api_key_env: the environment variable DEP_KEY is not set"]
