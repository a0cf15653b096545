"""Bad messages on the queue: refused or failed clearly, no upstream call, no crash."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import redis
from celery import Celery
from kombu import Connection

from api_tasks import JobFailed
from api_tasks.client import Client
from config.loader import load_settings
from tests.support.fake_upstream import FakeUpstream
from tests.support.figures import Figures
from tests.support.services import Spawn, WorkerProcess, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.faults]
USER = [{"role": "user", "content": "Hello"}]


class _Boom:
    """Unpickling this would create a file: the proof that pickle was never loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.path}",))


def _still_works(client: Client, model: str) -> None:
    response = client.submit_chat(USER, model=model).result(timeout=20)
    assert response is not None


@pytest.mark.parametrize("garbage", [b"this is not json {", b"\xff\xfe\x00", b"123",
                                     b'{"body": "x"}', b"[1, 2]"])
def test_garbage_on_the_queue_is_dropped_and_logged(client: Client, broker_client: redis.Redis,
                                                    worker: WorkerProcess, model: str,
                                                    garbage: bytes) -> None:
    queue = client.keys.celery_prefix() + "interactive"
    before = worker.log().count("dropped a queue message")
    broker_client.lpush(queue, garbage)
    _still_works(client, model)
    assert worker.proc is not None and worker.proc.poll() is None
    assert worker.log().count("dropped a queue message") == before + 1


def test_a_pickled_message_is_refused_and_never_loaded(
        client: Client, worker: WorkerProcess, tmp_path: Path, fake: FakeUpstream,
        model: str) -> None:
    marker = tmp_path / "pwned"
    job_id = str(uuid.uuid4())
    url = client.settings.redis.url
    with Connection(url, transport_options={"global_keyprefix": client.keys.celery_prefix()}) \
            as conn:
        conn.Producer(serializer="pickle").publish(
            ([[_Boom(marker)]], {"model": model}, {}), routing_key="interactive",
            headers={"task": "api_tasks.chat", "id": job_id, "lang": "py", "argsrepr": "",
                     "kwargsrepr": "", "origin": "test"}, exchange="")
    refused = "Refusing to deserialize untrusted content of type pickle"
    wait_until(lambda: refused in worker.log() and str(marker) in worker.log(), 20,
               "the worker to refuse the pickled message")
    _still_works(client, model)
    assert not marker.exists()
    assert fake.requests(model)[0].body["messages"] == USER  # type: ignore[index]


def test_an_unknown_task_name_is_refused(celery_app: Celery, client: Client, worker: WorkerProcess,
                                         model: str) -> None:
    sent = celery_app.send_task("api_tasks.no_such_task", args=[1], queue="interactive")
    wait_until(lambda: sent.id in worker.log() and "unregistered" in worker.log().lower(), 20,
               "the worker to refuse the unknown task")
    _still_works(client, model)


@pytest.mark.parametrize(("args", "kwargs", "field"), [
    ([], {}, "messages"),
    ([[{"role": "user"}]], {}, "messages[0].content"),
    ([USER], {"model": 7}, "model"),
    ([USER], {"stream": "yes"}, "stream"),
    ([USER], {"n": float("inf")}, "n"),
])
def test_missing_or_ill_typed_fields_from_a_plain_client(celery_app: Celery,
        client: Client, fake: FakeUpstream, worker: WorkerProcess, args: list[object],
        kwargs: dict[str, object], field: str) -> None:
    sent = celery_app.send_task("api_tasks.chat", args=args, kwargs=kwargs)
    with pytest.raises(JobFailed) as caught:
        client.job(sent.id).result(timeout=20)
    error = caught.value.error
    assert error["code"] == "invalid_job" and error["param"] == field
    assert f"job {sent.id} refused: {field}" in worker.log()
    assert worker.proc is not None and worker.proc.poll() is None


def test_an_oversized_prompt_from_a_plain_client_fails_without_a_call(celery_app: Celery,
        client: Client, fake: FakeUpstream, model: str) -> None:
    huge = "x" * (client.settings.jobs.max_request_bytes + 1)
    sent = celery_app.send_task("api_tasks.completion", args=[huge], kwargs={"model": model})
    with pytest.raises(JobFailed) as caught:
        client.job(sent.id).result(timeout=20)
    assert caught.value.error["code"] == "invalid_job" and caught.value.error["param"] == "prompt"
    assert fake.requests(model) == []


def _peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), in MB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines()
                    if line.startswith("VmHWM:"))) / 1024


def test_a_huge_message_is_dropped_before_it_is_decoded(
        worker_env: dict[str, str], spawn: Spawn, redis_client: redis.Redis,
        fake: FakeUpstream, model: str, figures: Figures) -> None:
    """50 MB with a bare-string argument once took a worker to 2.4 GB (52 million
    positional arguments); it is refused unread, and the worker goes on."""
    env = {**worker_env, "API_TASKS_PREFIX": f"big{uuid.uuid4().hex[:6]}"}
    own = Client(load_settings(env={k: v for k, v in env.items() if k != "FAKE_UPSTREAM_KEY"}))
    worker = spawn(env, "big", concurrency=8)
    _still_works(own, model)
    before = _peak_rss_mb(worker.pid)
    job_id = str(uuid.uuid4())
    with Connection(own.settings.redis.url,
                    transport_options={"global_keyprefix": own.keys.celery_prefix()}) as conn:
        conn.Producer(serializer="json").publish(
            ("x" * 50_000_000, {"model": model}, {}), routing_key="interactive", exchange="",
            headers={"task": "api_tasks.completion", "id": job_id, "lang": "py",
                     "argsrepr": "", "kwargsrepr": "", "origin": "test"})
    wait_until(lambda: "dropped a queue message of" in worker.log(), 30,
               "the worker to drop the huge message")
    _still_works(own, model)
    after = _peak_rss_mb(worker.pid)
    assert worker.proc is not None and worker.proc.poll() is None
    assert after - before < 400, f"peak RSS grew from {before:.0f} to {after:.0f} MB"
    assert fake.requests(model) and all(r.body["prompt"] != "x" for r in fake.requests(model)
                                        if r.body and "prompt" in r.body)
    figures.add(f"a 50 MB message with a bare-string argument (worker peak RSS "
                f"{before:.0f} -> {after:.0f} MB)", 1, 0, 0, 0)


def test_the_largest_non_ascii_job_submit_allows_still_runs(
        client: Client, fake: FakeUpstream, model: str) -> None:
    """The message-size bound must fit any job that passes submit: 4-byte characters grow
    to 12 bytes of JSON escapes in the message, then 4/3 as base64."""
    budget = client.settings.jobs.max_request_bytes - 200  # room for the other fields
    prompt = "\U0001f600" * (budget // 4)
    job = client.submit_completion(prompt, model=model, max_tokens=1)
    assert job.result(timeout=60) is not None
    [call] = fake.requests(model)
    assert call.body is not None and call.body["prompt"] == prompt
