"""The runner in-process, against a real Redis and a scripted HTTP upstream on loopback: one
delivery from claim to the recorded end, retries, refusals, and a second delivery dropped."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest

from api_tasks.execution.delivery import Outcome
from api_tasks.record.events import EVENT_FIELD
from api_tasks.record.job_record import Field, JobStatus
from api_tasks.runtime import Runtime
from config.loader import load_settings
from tests.support.fake_upstream import FakeUpstream, HttpError, Reply

USER = [{"role": "user", "content": "Hello"}]


@pytest.fixture
def runtime(worker_env: dict[str, str]) -> Iterator[Runtime]:
    """A worker's parts in this process, under a prefix of their own (no Celery, no queue)."""
    env = {**worker_env, "API_TASKS_PREFIX": f"run{uuid.uuid4().hex[:8]}"}
    parts = Runtime(load_settings(env=env))
    parts.start()
    yield parts
    parts.close()


def _events(parts: Runtime, job_id: str) -> list[tuple[str, dict[str, object]]]:
    return [(entry_id.decode(), json.loads(fields[EVENT_FIELD.encode()]))
            for entry_id, fields in parts.redis.xrange(parts.keys.events(job_id))]


def test_a_streamed_job_runs_to_one_recorded_end(runtime: Runtime, fake: FakeUpstream,
                                                 model: str) -> None:
    fake.script(model, Reply(pieces=["Hel", "lo", "!"]))
    job_id = uuid.uuid4().hex
    outcome = runtime.runner.run(job_id, "chat", USER, {"model": model, "stream": True})
    assert outcome is Outcome.SUCCEEDED
    record = runtime.store.info(job_id)
    assert record[Field.STATUS] == JobStatus.SUCCEEDED and record[Field.DELIVERIES] == "1"
    assert Field.TOKEN not in record and record[Field.ATTEMPTS] == "1"
    events = _events(runtime, job_id)
    assert [event["type"] for _, event in events] == ["chunk"] * 6 + ["done"]
    assert [entry_id for entry_id, _ in events] == [f"1-{n}" for n in range(1, 8)]
    result = runtime.store.result(job_id)
    assert result is not None and result["status"] == "succeeded" and result["attempts"] == 1
    assert result["response"]["choices"][0]["message"]["content"] == "Hello!"
    assert events[-1][1]["usage"] == result["response"]["usage"]
    # the body sent carries the layered defaults under the job's own fields
    sent = fake.requests(model)[-1].body
    assert sent is not None and sent["temperature"] == 0.2 and sent["stream"] is True
    # a second delivery of the ended job calls nobody and writes nothing
    assert runtime.runner.run(job_id, "chat", USER, {"model": model, "stream": True}) \
        is Outcome.DROPPED
    assert len(fake.requests(model)) == 1 and len(_events(runtime, job_id)) == 7
    assert not runtime.redis.zscore(runtime.keys.running(runtime.keys.shard(job_id)), job_id)


def test_a_server_error_is_retried_and_a_bad_request_is_not(runtime: Runtime,
                                                           fake: FakeUpstream,
                                                           model: str) -> None:
    fake.script(model, HttpError(503), Reply(content="fine"))
    job_id = uuid.uuid4().hex
    assert runtime.runner.run(job_id, "chat", USER, {"model": model}) is Outcome.SUCCEEDED
    result = runtime.store.result(job_id)
    assert result is not None and result["attempts"] == 2
    assert result["response"]["choices"][0]["message"]["content"] == "fine"

    fake.script(model, HttpError(400, error={"message": "no such thing", "code": "bad"}))
    job_id = uuid.uuid4().hex
    assert runtime.runner.run(job_id, "chat", USER, {"model": model}) is Outcome.FAILED
    result = runtime.store.result(job_id)
    assert result is not None and result["error"]["code"] == "bad"
    assert result["error"]["status"] == 400 and result["attempts"] == 1
    assert len(fake.requests(model)) == 3
    [(_, final)] = _events(runtime, job_id)
    assert final["type"] == "error" and final["error"]["code"] == "bad"


def test_a_job_refused_in_the_worker_fails_with_the_field_named(runtime: Runtime,
                                                               fake: FakeUpstream,
                                                               model: str) -> None:
    job_id = uuid.uuid4().hex  # as a plain Celery client could send it: no record before
    outcome = runtime.runner.run(job_id, "chat", USER, {"model": model, "temperature": 9})
    assert outcome is Outcome.FAILED
    result = runtime.store.result(job_id)
    assert result is not None and result["error"]["param"] == "temperature"
    assert result["attempts"] == 0 and fake.requests(model) == []
    assert runtime.store.info(job_id)[Field.STATUS] == JobStatus.FAILED
