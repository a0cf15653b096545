"""The JSON log format: one object a line, each line about a job with that job's fields."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from api_tasks.broker import create_app
from api_tasks.client import Client
from config.loader import load_settings
from tests.conftest import SECRET as UPSTREAM_KEY
from tests.support.fake_upstream import FakeUpstream, HttpError, Reply
from tests.support.services import Spawn, wait_until

pytestmark = pytest.mark.integration
USER = [{"role": "user", "content": "Hello"}]


def _lines(log: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


def test_each_line_about_a_job_carries_its_fields(worker_env: dict[str, str], spawn: Spawn,
                                                 fake: FakeUpstream, model: str) -> None:
    env = {**worker_env, "API_TASKS_LOG_FORMAT": "json", "API_TASKS_LOG_LEVEL": "INFO",
           "API_TASKS_PREFIX": f"jl{uuid.uuid4().hex[:6]}"}
    worker = spawn(env, "json-logs")
    client = Client(load_settings(env={k: v for k, v in env.items()
                                       if k != "FAKE_UPSTREAM_KEY"}))
    keyed = "keyed-" + model  # the upstream with a key: it must never reach a line
    fake.script(keyed, HttpError(503, error={"message": f"overloaded ({UPSTREAM_KEY})"}),
                Reply(content="fine"))
    job = client.submit_chat(USER, model=keyed, queue="bulk")
    assert job.result(timeout=30) is not None
    wait_until(lambda: any(line.get("job_id") == job.id and line["logger"] == "celery.app.trace"
                           for line in _lines(worker.log())), 10, "Celery's line on the end")
    log = worker.log()
    assert UPSTREAM_KEY not in log
    about = [line for line in _lines(log) if line.get("job_id") == job.id]
    assert len(about) >= 4  # Celery's received, the retry, the end, Celery's succeeded
    assert any(line["logger"] == "celery.worker.strategy" for line in about)
    for line in (line for line in about if line["logger"].startswith("api_tasks")):
        assert {"time", "level", "logger", "message", "process"} <= set(line)
        assert (line["attempt"], line["queue"], line["upstream"], line["model"]) == \
            (1, "bulk", "keyed", keyed)
    assert any("attempt 1 failed" in line["message"] and line["deployment"] == "keyed"
               for line in about)
    # no line about the job is left plain: every line naming it is JSON
    assert not [line for line in log.splitlines()
                if job.id in line and not line.startswith("{")]
    # a plain Celery client's job: its arguments are its prompt, and no line shows them
    prompt = f"a private prompt {uuid.uuid4().hex}"
    app = create_app(client.settings)
    try:
        sent = app.send_task("api_tasks.chat", args=[[{"role": "user", "content": prompt}]],
                             kwargs={"model": model}, queue="interactive")
        assert client.job(sent.id).result(timeout=30) is not None
    finally:
        app.close()
    wait_until(lambda: any(line.get("job_id") == sent.id and line["logger"] ==
                           "celery.app.trace" for line in _lines(worker.log())), 10,
               "Celery's line on the plain client's job")
    assert prompt not in worker.log()
