"""The CLI as a user runs it: python -m api_tasks ..."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest

from tests.support.fake_upstream import FakeUpstream, HttpError, Reply, Slow
from tests.support.services import ROOT, Spawn, WorkerProcess, free_port, wait_until

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
    view = json.loads(status.stdout)
    assert view["status"] == "succeeded" and view["model"] == model and view["stream"] is False
    assert (view["attempt"], view["calls"], view["crashes"], view["error"]) == (1, 1, 0, None)
    assert view["finished_at"] >= view["started_at"] >= view["created_at"] > 0
    assert set(view) == {"id", "status", "kind", "model", "upstream", "queue", "stream",
                         "created_at", "started_at", "finished_at", "attempt", "calls",
                         "crashes", "waiting_for", "waiting_until", "batch", "error",
                         "deployment", "tries"}
    assert view["deployment"] == "fake" and view["tries"] == [
        {"deployment": "fake", "model": model, "error": None}]
    plain = cli(env, "status", job_id)
    assert plain.stdout.startswith(f"{job_id} succeeded (attempt 1, 1 call, ")
    cancel = cli(env, "cancel", job_id)  # it is not running either way: not an error
    assert cancel.returncode == 0 and "already succeeded; nothing to cancel" in cancel.stdout


def test_status_of_a_running_job_shows_its_attempt(env: dict[str, str], fake: FakeUpstream,
                                                   model: str) -> None:
    fake.script(model, Slow(3.0))
    job_id = cli(env, "chat", "Hi", "--model", model, "--detach").stdout.strip()
    fake.wait_for_requests(model, 1, timeout=10)
    plain = cli(env, "status", job_id)
    assert plain.stdout.startswith(f"{job_id} running (attempt 1, started ")
    view = json.loads(cli(env, "status", job_id, "--json").stdout)
    assert view["status"] == "running" and view["attempt"] == 1 and view["calls"] is None


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


@pytest.mark.parametrize(("args", "field"), [
    (("chat", "hi", "--param", "messages=[]"), "messages"),
    (("complete", "x", "--param", "prompt=y"), "prompt"),
    (("chat", "hi", "--param", "temperature=nan"), "temperature"),
    (("chat", "hi", "--param", 'temperature="hot"'), "temperature"),
    (("chat", "hi", "-p", "top_p=1.5"), "top_p"),
    (("chat", "hi", "-p", "n=0"), "n"),
    (("chat", "hi", "-p", "max_tokens=2.5"), "max_tokens"),
    (("chat", "hi", "-p", "stream=yes"), "stream"),
    (("chat", "hi", "-p", "stop=7"), "stop"),
    (("complete", "x", "--system", "be brief"), "--system"),
])
def test_bad_params_exit_2_naming_the_field_and_send_nothing(
        env: dict[str, str], fake: FakeUpstream, model: str, args: tuple[str, ...],
        field: str) -> None:
    done = cli(env, *args, "--model", model)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"error: {field}: ") and "Traceback" not in done.stderr
    assert fake.requests(model) == []


def test_unknown_params_pass_through_untouched(env: dict[str, str], fake: FakeUpstream,
                                              model: str) -> None:
    done = cli(env, "chat", "hi", "--model", model, "-p", 'extra_body={"top_k": 5}',
               "-p", "min_p=0.1")
    assert done.returncode == 0, done.stderr
    body = fake.requests(model)[0].body
    assert body is not None and body["extra_body"] == {"top_k": 5} and body["min_p"] == 0.1


def test_dry_run_prints_the_merged_call_and_enqueues_nothing(
        env: dict[str, str], fake: FakeUpstream) -> None:
    model = f"layered-{uuid.uuid4().hex[:8]}"
    done = cli(env, "chat", "Hello", "--model", model, "--system", "be brief",
               "-p", "max_tokens=9", "--dry-run")
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["upstream"] == "fake" and shown["queue"] == "interactive"
    assert shown["url"] == fake.base_url + "/v1/chat/completions"
    body = shown["body"]
    # every layer: global defaults, the upstream's temperature, the model glob's top_p and
    # its null that removes presence_penalty, then the job's own fields
    assert body["temperature"] == 0.2 and body["top_p"] == 0.5 and body["max_tokens"] == 9
    assert body["frequency_penalty"] == 0.8 and "presence_penalty" not in body
    assert body["messages"] == [{"role": "system", "content": "be brief"},
                                {"role": "user", "content": "Hello"}]
    assert "submitted" not in done.stderr and fake.requests(model) == []


def test_redis_down_is_a_clear_error_not_a_hang(env: dict[str, str]) -> None:
    down = {**env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    done = cli(down, "chat", "Hi", timeout=30)
    assert done.returncode == 4
    assert "Redis is unavailable" in done.stderr and "Traceback" not in done.stderr


def test_health_reads_the_workers_liveness_records(env: dict[str, str], worker_env: dict[str, str],
                                                   spawn: Spawn) -> None:
    done = cli(env, "health", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["status"] == "ok" and report["redis"] == "ok" and report["workers"]
    assert all(w["seen_ago"] < 10 and w["pid"] > 0 for w in report["workers"])
    # one worker of its own, named, then killed: its record lapses within seconds
    own = {**worker_env, "API_TASKS_PREFIX": f"hl{uuid.uuid4().hex[:6]}"}
    probe = {k: v for k, v in own.items() if k != "FAKE_UPSTREAM_KEY"}
    assert cli(probe, "health").returncode == 1  # nobody under this prefix yet
    process = spawn(own, "probed")
    [alive_one] = json.loads(cli(probe, "health", "--json").stdout)["workers"]
    host_pid = f"{alive_one['host']}.{process.pid}"
    named = cli(probe, "health", "--worker", host_pid)
    assert named.returncode == 0 and named.stdout.startswith(f"ok: {host_pid}.")
    assert cli(probe, "health", "--worker", "no-such-host").returncode == 1
    process.kill()
    wait_until(lambda: cli(probe, "health", "--worker", host_pid).returncode == 1, 20,
               "the killed worker's record to lapse")
    gone = cli(probe, "health", "--worker", host_pid)
    assert "no worker named" in gone.stderr and "Traceback" not in gone.stderr


def test_health_with_redis_down_exits_4(env: dict[str, str]) -> None:
    down = {**env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    done = cli(down, "health", "--json")
    assert done.returncode == 4
    assert json.loads(done.stdout)["status"] == "unavailable" and "Traceback" not in done.stderr
    plain = cli(down, "health")
    assert plain.returncode == 4 and plain.stderr.startswith("unhealthy: Redis unavailable")
