"""The CLI as a user runs it: python -m api_tasks ..."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.fake_upstream import FakeUpstream, HttpError, Reply
from tests.support.services import ROOT, WorkerProcess, free_port

pytestmark = pytest.mark.integration


def cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "api_tasks", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def env(worker_env: dict[str, str], worker: WorkerProcess) -> dict[str, str]:
    return {k: v for k, v in worker_env.items() if k != "FAKE_UPSTREAM_KEY"}


def test_chat_prints_the_answer(env: dict[str, str], fake: FakeUpstream, model: str) -> None:
    done = cli(env, "chat", "Hello", "--model", model, "--param", "temperature=0.3",
               "--param", "presence_penalty=null", "-p", 'stop=["\\n"]')
    assert done.returncode == 0, done.stderr
    assert done.stdout == "echo: Hello\n"
    body = fake.requests(model)[0].body
    assert body is not None and body["temperature"] == 0.3 and body["stop"] == ["\n"]
    assert "presence_penalty" not in body


def test_stream_prints_tokens_live(env: dict[str, str], fake: FakeUpstream, model: str) -> None:
    fake.script(model, Reply(pieces=["one ", "two ", "three"]))
    done = cli(env, "chat", "Hi", "--model", model, "--stream")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "one two three\n"


def test_complete_json_detach_status_result(env: dict[str, str], model: str) -> None:
    done = cli(env, "complete", "Say this is a test", "--model", model, "--detach")
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    result = cli(env, "result", job_id, "--json")
    assert result.returncode == 0
    assert json.loads(result.stdout)["choices"][0]["text"] == "echo: Say this is a test"
    status = cli(env, "status", job_id, "--json")
    assert json.loads(status.stdout)["status"] == "succeeded"
    cancel = cli(env, "cancel", job_id)
    assert cancel.returncode == 1 and "already succeeded" in cancel.stderr


def test_failed_job_exits_1_with_the_error_object(env: dict[str, str], fake: FakeUpstream,
                                                  model: str) -> None:
    fake.script(model, HttpError(400, error={"message": "bad things", "code": "bad"}))
    done = cli(env, "chat", "Hi", "--model", model)
    assert done.returncode == 1
    assert "bad things" in done.stderr and '"status": 400' in done.stderr


def test_invalid_input_exits_2_naming_the_field(env: dict[str, str]) -> None:
    done = cli(env, "chat", "Hi", "--upstream", "nope")
    assert done.returncode == 2 and done.stderr.startswith("error: upstream:")
    assert cli(env, "status", "no-such-job").returncode == 4


def test_redis_down_is_a_clear_error_not_a_hang(env: dict[str, str]) -> None:
    down = {**env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    done = cli(down, "chat", "Hi", timeout=30)
    assert done.returncode == 4
    assert "Redis is unavailable" in done.stderr and "Traceback" not in done.stderr
