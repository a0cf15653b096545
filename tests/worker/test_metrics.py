"""Prometheus metrics: a worker's and a gateway's /metrics after a known set of jobs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from api_tasks import JobFailed
from api_tasks.broker import task_message
from api_tasks.client import Client
from api_tasks.record.job_record import JobStatus
from api_tasks.record.workers import alive, records
from config.loader import load_settings
from config.settings import Settings
from tests.conftest import GATEWAY_KEY
from tests.support.fake_upstream import FakeUpstream, HttpError, Reply
from tests.support.scrape import Samples, metrics_ports, scrape, value
from tests.support.services import (
    ROOT,
    GatewayProcess,
    Spawn,
    WorkerProcess,
    free_port,
    wait_until,
)

pytestmark = pytest.mark.integration
USER = [{"role": "user", "content": "Hello"}]


@pytest.fixture
def own(worker_env: dict[str, str], spawn: Spawn) -> Iterator[tuple[Client, WorkerProcess]]:
    env = {**worker_env, "API_TASKS_PREFIX": f"mx{uuid.uuid4().hex[:6]}"}
    worker = spawn(env, "metrics")
    yield Client(load_settings(env={k: v for k, v in env.items()
                                    if k != "FAKE_UPSTREAM_KEY"})), worker


def _port(client: Client) -> int:
    [port] = metrics_ports(client)
    return port


def test_a_worker_counts_the_jobs_it_ran(own: tuple[Client, WorkerProcess],
                                         fake: FakeUpstream, model: str) -> None:
    client, _ = own
    labels = {"kind": "chat", "upstream": "fake", "model": "*", "queue": "interactive"}
    before = REGISTRY.get_sample_value("api_tasks_jobs_submitted_total", labels) or 0.0
    fake.script(model + "-bad", HttpError(400, error={"message": "no", "param": "top_p"}))
    fake.script(model + "-s", Reply(pieces=["one ", "two ", "three"]))
    done = [client.submit_chat(USER, model=model) for _ in range(5)]
    done.append(client.submit_chat(USER, model=model + "-s", stream=True))
    bad = [client.submit_chat(USER, model=model + "-bad") for _ in range(2)]
    results = [job.result(timeout=30) for job in done]
    for job in bad:
        with pytest.raises(JobFailed):
            job.result(timeout=30)
    usage = [result.get("usage") or {} for result in results if result is not None]
    assert len(usage) == 6
    chunks = [entry for entry, fields in client.redis.xrange(client.keys.events(done[-1].id))
              if json.loads(fields[b"event"])["type"] == "chunk"]
    # the producer (this process) counted what it sent
    assert REGISTRY.get_sample_value("api_tasks_jobs_submitted_total", labels) == before + 8
    samples = scrape(f"http://127.0.0.1:{_port(client)}/metrics")
    assert value(samples, "api_tasks_jobs_total", status="succeeded", upstream="fake",
                 model="*", queue="interactive", kind="chat") == 6
    assert value(samples, "api_tasks_jobs_total", status="failed") == 2
    assert value(samples, "api_tasks_job_run_seconds_count", kind="chat") == 8
    assert value(samples, "api_tasks_job_queue_seconds_count", queue="interactive") == 8
    assert value(samples, "api_tasks_time_to_first_chunk_seconds_count") == 1
    # as many chunks as the streamed job's events hold, as many tokens as the answers reported
    assert value(samples, "api_tasks_chunks_relayed_total", upstream="fake") == len(chunks) >= 3
    assert value(samples, "api_tasks_upstream_responses_total", **{"class": "2xx"}) == 6
    assert value(samples, "api_tasks_upstream_responses_total", **{"class": "4xx"}) == 2
    for direction, field in (("in", "prompt_tokens"), ("out", "completion_tokens")):
        assert value(samples, "api_tasks_tokens_total", direction=direction) == sum(
            u.get(field, 0) for u in usage) > 0
    assert value(samples, "api_tasks_calls_in_flight") == 0
    # what only Redis knows, read at the scrape
    assert value(samples, "api_tasks_redis_up") == 1
    assert value(samples, "api_tasks_workers_alive") == 1
    assert value(samples, "api_tasks_queue_depth", queue="interactive") == 0
    assert value(samples, "api_tasks_running") == 0
    # labels stay bounded: no job's raw model name, no job id
    text = httpx.get(f"http://127.0.0.1:{_port(client)}/metrics", timeout=10).text
    assert model not in text and done[0].id not in text


def test_a_worker_counts_retries_429s_and_the_waits_they_cost(
        own: tuple[Client, WorkerProcess], fake: FakeUpstream, model: str) -> None:
    client, _ = own
    fake.script(model + "-again", HttpError(500, error={"message": "hiccup"}),
                Reply(content="second time"))
    # a 429 asking for 2 s: longer than a worker waits in place (reserve_ahead, 1 s), so the
    # job waits outside it
    fake.script(model + "-busy", HttpError(429, error={"message": "slow down"},
                                           headers={"Retry-After": "2"}),
                Reply(content="after the wait"))
    url = f"http://127.0.0.1:{_port(client)}/metrics"
    busy = client.submit_chat(USER, model=model + "-busy")
    # the cluster's gauge, read from Redis at the scrape, while it is out (about 1.5 s)
    wait_until(lambda: value(scrape(url), "api_tasks_waiting") == 1, 10,
               "the job waiting outside the worker to show")
    again = client.submit_chat(USER, model=model + "-again")
    for job in (busy, again):
        assert job.result(timeout=30) is not None
    samples = scrape(url)
    assert value(samples, "api_tasks_retries_total", upstream="fake") == 1  # not the 429's
    assert value(samples, "api_tasks_rate_limited_total", upstream="fake") == 1
    assert value(samples, "api_tasks_upstream_responses_total", **{"class": "5xx"}) == 1
    assert value(samples, "api_tasks_upstream_responses_total", **{"class": "4xx"}) == 1
    assert value(samples, "api_tasks_upstream_responses_total", **{"class": "2xx"}) == 2
    # both waited out the cool-down (the whole deployment backs off): 2 s, and what was
    # left of it when the second came
    waits = value(samples, "api_tasks_limit_wait_seconds_count", reason="cooldown")
    waited = value(samples, "api_tasks_limit_wait_seconds_sum", reason="cooldown")
    assert waits >= 2 and 2.0 <= waited <= 4.5, (waits, waited)
    assert value(samples, "api_tasks_jobs_total", status="succeeded") == 2
    assert value(samples, "api_tasks_waiting") == 0  # none left outside the workers


def test_a_job_cancelled_before_any_worker_took_it_is_counted_once(
        own: tuple[Client, WorkerProcess], fake: FakeUpstream, model: str,
        broker_client: redis.Redis) -> None:
    client, worker = own
    fake.script(model + "-slow", Reply(delay=6.0))  # long enough to cancel the two meanwhile
    busy = [client.submit_chat(USER, model=model + "-slow") for _ in range(8)]  # every slot
    fake.wait_for_requests(model + "-slow", 8, timeout=30)
    queued = [client.submit_chat(USER, model=model) for _ in range(2)]
    for job in queued:
        assert job.cancel() and job.status() is JobStatus.CANCELLED
    for job in busy:
        assert job.result(timeout=30) is not None
    url = f"http://127.0.0.1:{_port(client)}/metrics"
    # the worker drops the cancelled jobs' messages when it gets to them, and counts each once
    wait_until(lambda: value(scrape(url), "api_tasks_jobs_total", status="cancelled") == 2,
               20, "the cancelled jobs counted")
    # a second delivery of one of them is dropped too, and not counted again
    again = task_message("api_tasks.chat", [USER], {"model": model}, queued[0].id,
                         "interactive")
    broker_client.lpush(client.keys.queue("interactive"), again)
    wait_until(lambda: worker.log().count(f"job {queued[0].id} is cancelled: delivery "
                                          "dropped") == 2, 20, "the second delivery dropped")
    samples = scrape(url)
    assert value(samples, "api_tasks_jobs_total", status="cancelled", queue="interactive",
                 kind="chat", upstream="fake") == 2
    assert value(samples, "api_tasks_queue_depth", queue="interactive") == 0
    assert not client.redis.hexists(client.keys.job(queued[0].id), "uncounted")
    assert not fake.requests(model)


def test_the_gateway_counts_what_it_submitted(gateway: GatewayProcess, fake: FakeUpstream,
                                              model: str) -> None:
    def submitted(samples: Samples) -> float:
        return value(samples, "api_tasks_jobs_submitted_total", kind="chat", upstream="fake")

    before = submitted(scrape(gateway.url + "/metrics"))
    headers = {"Authorization": f"Bearer {GATEWAY_KEY}"}
    body: dict[str, Any] = {"model": model, "messages": USER}
    for _ in range(3):
        answer = httpx.post(gateway.url + "/v1/chat/completions", json=body, headers=headers,
                            timeout=30)
        assert answer.status_code == 200
    samples = scrape(gateway.url + "/metrics")
    assert submitted(samples) == before + 3
    assert value(samples, "api_tasks_redis_up") == 1 and \
        value(samples, "api_tasks_workers_alive") >= 1


def test_every_metric_the_dashboard_queries_exists(own: tuple[Client, WorkerProcess]) -> None:
    client, _ = own
    dashboard = json.loads((ROOT / "config/grafana/dashboards/api-tasks.json").read_text())
    queried = {re.sub(r"_(total|bucket|count|sum)$", "", name)
               for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"api_tasks_[a-z_]+", target["expr"])}
    assert len(queried) >= 15
    text = httpx.get(f"http://127.0.0.1:{_port(client)}/metrics", timeout=10).text
    exported = {family.name for family in text_string_to_metric_families(text)}
    assert queried <= exported, queried - exported


def test_a_real_prometheus_scrapes_a_worker(own: tuple[Client, WorkerProcess], fake: FakeUpstream,
                                            model: str, tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    # a missing binary fails the test, as a missing browser fails the playground's: a skip
    # would let a run without it pass
    assert binary, "install Debian's prometheus (scripts/test does, as root)"
    client, _ = own
    for job in [client.submit_chat(USER, model=model) for _ in range(3)]:
        assert job.result(timeout=30) is not None
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [{"job_name": "api-tasks-worker", "static_configs": [
            {"targets": [f"127.0.0.1:{_port(client)}"]}]}]}))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    server = subprocess.Popen([binary, f"--config.file={config}",
                               f"--storage.tsdb.path={tmp_path / 'data'}",
                               f"--web.listen-address=127.0.0.1:{port}"],
                              stdout=log, stderr=subprocess.STDOUT)
    query = 'sum(api_tasks_jobs_total{status="succeeded", upstream="fake"})'

    def answered() -> bool:
        try:
            reply = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": query},
                              timeout=5).json()
        except (httpx.HTTPError, ValueError):
            return False
        result = reply.get("data", {}).get("result", [])
        return bool(result) and float(result[0]["value"][1]) == 3

    try:
        wait_until(answered, 60, "Prometheus to answer for api_tasks_jobs_total", interval=0.5)
    finally:
        server.terminate()
        server.wait(20)
        log.close()


def test_metrics_off_serve_and_count_nothing(worker_env: dict[str, str], spawn: Spawn,
                                             model: str) -> None:
    env = {**worker_env, "API_TASKS_PREFIX": f"mo{uuid.uuid4().hex[:6]}",
           "API_TASKS_METRICS_PORT": "off"}
    worker = spawn(env, "metrics-off")
    client = Client(load_settings(env={k: v for k, v in env.items()
                                       if k != "FAKE_UPSTREAM_KEY"}))
    assert client.submit_chat(USER, model=model).result(timeout=30) is not None

    def record() -> dict[str, Any]:
        [found] = client.store.shell.run(records(client.keys, client.store.shell.run(
            alive(client.keys))))
        return found
    # its liveness record, renewed every 2 s, says it ended the job (it still counts that)
    wait_until(lambda: record()["ended"] == {"succeeded": 1}, 10, "the record to say so")
    assert "metrics_port" not in record()
    assert "metrics on http" not in worker.log()


def test_a_model_label_is_a_configured_name_or_glob_never_a_raw_string(
        settings: Settings) -> None:
    from api_tasks.metrics import model_label

    assert model_label(settings, "tight", "tight-mini") == "tight-*"  # the glob it matched
    assert model_label(settings, "fake", "layered-x") == "*"  # the catch-all's glob
    # a job's own string that matches nothing of its upstream's: no label of its own
    assert model_label(settings, "tight", "job-123e4567-random") == ""
    assert model_label(settings, "no-such-upstream", "anything") == ""
    assert model_label(settings, "fake", None) == ""


def test_a_metrics_port_already_taken_costs_a_warning_not_the_process(
        caplog: pytest.LogCaptureFixture) -> None:
    import socket

    from api_tasks import metrics

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with caplog.at_level("WARNING", logger="api_tasks.metrics"):
            assert metrics.serve("127.0.0.1", port) is None
    assert f"cannot listen on 127.0.0.1:{port}" in caplog.text
    assert "its own worker.metrics_port, or 0" in caplog.text  # and what to do about it
