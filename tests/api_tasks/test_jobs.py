"""Chat and completion jobs end to end: producer -> Redis -> worker -> fake upstream."""

from __future__ import annotations

import json
import threading
import uuid

import pytest
import redis

from api_tasks import InvalidJob, JobNotFound, JobStatus
from api_tasks.client import Client
from config.settings import Settings
from tests.support.fake_upstream import FakeUpstream, Reply

pytestmark = pytest.mark.integration
USER = [{"role": "user", "content": "Hello"}]


def test_chat_job_returns_openai_response(client: Client, fake: FakeUpstream, model: str) -> None:
    job = client.submit_chat([{"role": "user", "content": "Hi there"}], model=model)
    response = job.result(timeout=20)
    assert response is not None
    assert response["object"] == "chat.completion"
    assert response["choices"][0]["message"]["content"] == "echo: Hi there"
    assert response["usage"]["total_tokens"] > 0
    assert job.status() is JobStatus.SUCCEEDED
    [request] = fake.requests(model)
    assert request.path == "/v1/chat/completions"


def test_completion_job(client: Client, fake: FakeUpstream, model: str) -> None:
    job = client.submit_completion("Say this is a test", model=model)
    response = job.result(timeout=20)
    assert response is not None
    assert response["choices"][0]["text"] == "echo: Say this is a test"
    assert fake.requests(model)[0].path == "/v1/completions"


def test_payload_layers_reach_the_upstream(client: Client, fake: FakeUpstream) -> None:
    model = "layered-model-1"
    job = client.submit_chat(USER, model=model, temperature=0.9, frequency_penalty=None,
                             seed=7, response_format={"type": "json_object"},
                             tools=[{"type": "function", "function": {"name": "f"}}])
    job.result(timeout=20)
    body = fake.requests(model)[-1].body
    assert body is not None
    assert body["temperature"] == 0.9          # job beats the upstream's 0.2
    assert body["top_p"] == 0.5                # model layer beats global 0.75
    assert "presence_penalty" not in body      # model layer's null removed the global default
    assert "frequency_penalty" not in body     # the job's null removed it
    assert body["max_tokens"] == 8096          # global default kept
    assert body["seed"] == 7 and body["response_format"] == {"type": "json_object"}
    assert body["tools"][0]["function"]["name"] == "f"
    assert "upstream" not in body and "store_result" not in body


def test_upstream_chosen_by_name_and_by_model(client: Client, fake: FakeUpstream) -> None:
    client.submit_chat(USER, model="keyed-a").result(timeout=20)
    client.submit_chat(USER, model="plain-b", upstream="keyed").result(timeout=20)
    assert fake.requests("keyed-a")[0].headers["authorization"].startswith("Bearer sk-test")
    assert fake.requests("plain-b")[0].headers["authorization"].startswith("Bearer sk-test")


def test_result_keys_are_plain_json_with_ttl(client: Client, redis_client: redis.Redis,
                                             model: str) -> None:
    job = client.submit_chat(USER, model=model, result_ttl=120)
    job.result(timeout=20)
    keys = client.keys
    envelope = json.loads(redis_client.get(keys.result(job.id)) or b"null")
    assert envelope["id"] == job.id and envelope["status"] == "succeeded"
    assert envelope["response"]["choices"][0]["message"]["content"] == "echo: Hello"
    assert envelope["error"] is None and envelope["attempts"] == 1
    for key in (keys.result(job.id), keys.job(job.id), keys.events(job.id)):
        assert 0 < redis_client.ttl(key) <= 120, key


def test_fire_and_forget_without_stored_result(client: Client, redis_client: redis.Redis,
                                               model: str) -> None:
    job = client.submit_chat(USER, model=model, store_result=False)
    assert job.result(timeout=20) is None
    assert redis_client.exists(client.keys.result(job.id)) == 0
    assert job.status() is JobStatus.SUCCEEDED


def test_submit_returns_before_the_job_runs(client: Client, fake: FakeUpstream, model: str) -> None:
    fake.script(model, Reply(delay=1.0))
    job = client.submit_chat(USER, model=model)
    assert job.status() in (JobStatus.QUEUED, JobStatus.RUNNING)
    assert job.result(timeout=20) is not None


def test_get_job_finds_it_again(client: Client, model: str) -> None:
    job = client.submit_completion("x", model=model)
    job.result(timeout=20)
    again = client.get_job(job.id)
    assert again.status() is JobStatus.SUCCEEDED
    assert again.result(timeout=1) == job.result(timeout=1)
    info = again.info()
    assert info["status"] == "succeeded" and info["kind"] == "completion"
    assert "token" not in info and "ended_by" not in info  # the workers' bookkeeping
    with pytest.raises(JobNotFound):
        client.get_job("no-such-job")


def _nested(depth: int) -> list[object]:
    """A list nested ``depth`` deep (json.dumps alone raises RecursionError on it)."""
    outer: list[object] = []
    inner = outer
    for _ in range(depth):
        inner.append([])
        inner = inner[0]  # type: ignore[assignment]
    return outer


@pytest.mark.parametrize(
    ("kind", "first", "params", "field"),
    [
        ("chat", [], {}, "messages"),
        ("chat", "hello", {}, "messages"),
        ("chat", [{"content": "x"}], {}, "messages[0].role"),
        ("chat", [{"role": "user", "content": 5}], {}, "messages[0].content"),
        ("chat", USER, {"upstream": "nope"}, "upstream"),
        ("chat", USER, {"temperature": float("nan")}, "temperature"),
        ("chat", USER, {"metadata": {"when": object()}}, "metadata.when"),
        ("chat", [{"role": "user", "content": "lone \ud800"}], {}, "messages[0].content"),
        ("completion", "lone \udfff", {}, "prompt"),
        ("completion", ["ok", "lone \udfff"], {}, "prompt[1]"),
        ("chat", USER, {"model": "m\ud800"}, "model"),
        ("chat", USER, {"metadata": {"k\ud800": 1}}, "metadata"),
        ("chat", USER, {"tools": _nested(100_000)}, "tools" + "[0]" * 64),
        ("chat", USER, {"api_key": "sk-x"}, "api_key"),
        ("chat", USER, {"queue": "fast"}, "queue"),
        ("completion", {"text": 1}, {}, "prompt"),
        ("completion", "x", {"stream": "yes"}, "stream"),
        ("completion", "x" * (5 * 1024 * 1024), {}, "prompt"),
    ],
)
def test_invalid_jobs_are_refused_at_submit(client: Client, redis_client: redis.Redis,
                                            kind: str, first: object, params: dict[str, object],
                                            field: str) -> None:
    job_id = f"refused-{uuid.uuid4().hex}"  # its own id: other tests' keys come and go
    with pytest.raises(InvalidJob) as caught:
        client.submit(kind, first, params, job_id=job_id)  # type: ignore[arg-type]
    assert caught.value.param == field
    assert str(caught.value).startswith(field)
    assert list(redis_client.scan_iter(match=f"*{job_id}*", count=1000)) == []


def test_a_failed_send_of_any_kind_leaves_no_record(
        settings: Settings, redis_client: redis.Redis, broker_client: redis.Redis) -> None:
    """Not only a lost connection: any error in the submit's transaction (here Redis refusing
    the message, as a lane's key holds something else) removes the new record."""
    own = Client(settings.model_copy(update={"redis": settings.redis.model_copy(
        update={"prefix": f"unsent{uuid.uuid4().hex[:6]}"})}))
    broker_client.set(own.keys.queue("interactive"), "not a list", ex=60)
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        own.submit_chat(USER, model="m-unsent")
    assert {key for client in (redis_client, broker_client)
            for key in client.scan_iter(match=f"{own.keys.prefix}:*", count=1000)} == {
        own.keys.queue("interactive").encode()}


def test_a_redis_that_forgot_its_scripts_never_shows_a_message_before_its_record(
        settings: Settings, redis_client: redis.Redis, broker_client: redis.Redis) -> None:
    """After a restart or SCRIPT FLUSH the submit's scripts are reloaded; its message must still
    come out only once its record is in (a worker popping it first would run the job with a
    record of its own, the submit's fields lost)."""
    own = Client(settings.model_copy(update={"redis": settings.redis.model_copy(
        update={"prefix": f"flush{uuid.uuid4().hex[:6]}"})}))
    own.submit_chat(USER, model="m-flushed")  # the pool and scripts are warm
    broker_client.delete(own.keys.queue("interactive"))
    seen: list[tuple[bytes, dict[bytes, bytes]]] = []
    watcher = redis.Redis(connection_pool=broker_client.connection_pool)
    looker = redis_client

    def pop() -> None:  # as a worker's BRPOP would, then a look at the record at once
        _, raw = watcher.brpop([own.keys.queue("interactive")], timeout=10) or (b"", b"")
        job_id = json.loads(raw)["headers"]["id"] if raw else ""
        seen.append((raw, looker.hgetall(own.keys.job(job_id))))

    thread = threading.Thread(target=pop)
    thread.start()
    redis_client.script_flush()
    broker_client.script_flush()
    job = own.submit("chat", USER, {"model": "m-flushed"}, fields={"metadata": '{"a": "kept"}'})
    thread.join(15)
    [(raw, record)] = seen
    assert raw, "the message never came"
    assert record.get(b"metadata") == b'{"a": "kept"}', record  # the record came first
    assert own.store.info(job.id)["metadata"] == '{"a": "kept"}'
