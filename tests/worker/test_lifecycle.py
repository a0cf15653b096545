"""Worker life: graceful SIGTERM finishes or requeues in-flight jobs, none lost."""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path

import pytest

from api_tasks import JobStatus, StreamRestarted
from api_tasks.client import Client
from config.loader import load_settings
from tests.support.fake_upstream import FakeUpstream, Reply
from tests.support.figures import Figures, outcomes
from tests.support.services import Spawn, WorkerProcess, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.faults]
USER = [{"role": "user", "content": "Hello"}]


@pytest.fixture
def own_env(worker_env: dict[str, str]) -> dict[str, str]:
    """A private prefix: its own queues and keys, so only this test's workers see its jobs."""
    return {**worker_env, "API_TASKS_PREFIX": f"life{uuid.uuid4().hex[:6]}"}


@pytest.fixture
def own_client(own_env: dict[str, str]) -> Client:
    return Client(load_settings(env=own_env))


def test_sigterm_finishes_short_jobs_and_requeues_long_ones(
        own_env: dict[str, str], own_client: Client, fake: FakeUpstream,
        spawn: Spawn, model: str, figures: Figures) -> None:
    fake.script(model + "-short", Reply(delay=1.0))
    fake.script(model + "-long", *[Reply(delay=30.0)] * 3, Reply(content="second worker"))
    first = spawn(own_env, "a", concurrency=8)
    short = [own_client.submit_chat(USER, model=model + "-short") for _ in range(3)]
    long = [own_client.submit_chat(USER, model=model + "-long") for _ in range(3)]
    fake.wait_for_requests(model + "-long", 3, timeout=10)
    fake.wait_for_requests(model + "-short", 3, timeout=10)
    first.signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert first.wait(timeout=20) == 0
    assert time.monotonic() - signalled < 3  # shutdown_grace is 3 s in the test settings
    assert all(job.status() is JobStatus.SUCCEEDED for job in short)
    assert all(job.status() is JobStatus.QUEUED for job in long)
    second = spawn(own_env, "b", concurrency=8)
    for job in long:
        response = job.result(timeout=30)
        assert response is not None
        assert response["choices"][0]["message"]["content"] == "second worker"
    wait_until(lambda: len(fake.requests(model + "-long")) == 6, 5, "six calls")
    counted = outcomes(lambda: [first.log(), second.log()], [j.id for j in [*short, *long]])
    assert counted == [1] * 6
    figures.add("SIGTERM with 3 short and 3 long jobs in flight (grace 3 s)", 6,
                counted.count(0), 0, len(fake.requests(model + "-long")) - 3,
                time.monotonic() - signalled)


def test_interactive_jobs_are_served_before_a_bulk_backlog(
        own_env: dict[str, str], own_client: Client, fake: FakeUpstream,
        spawn: Spawn, model: str) -> None:
    bulk = [own_client.submit_chat(USER, model=model, queue="bulk") for _ in range(20)]
    urgent = own_client.submit_chat(USER, model=model + "-urgent")
    assert urgent.info()["queue"] == "interactive" and bulk[0].info()["queue"] == "bulk"
    spawn(own_env, "p", concurrency=1)
    urgent.result(timeout=20)
    for job in bulk:
        job.result(timeout=20)
    [urgent_call] = fake.requests(model + "-urgent")
    bulk_calls = fake.requests(model)
    assert len(bulk_calls) == 20
    # one bulk job may already have been taken when the worker started; no more
    assert sum(call.at < urgent_call.at for call in bulk_calls) <= 1


def test_a_stream_requeued_at_shutdown_restarts_as_an_announced_attempt(
        own_env: dict[str, str], own_client: Client, fake: FakeUpstream,
        spawn: Spawn, model: str, figures: Figures) -> None:
    fake.script(model, Reply(pieces=[f"old{i} " for i in range(100)], chunk_delay=0.1),
                Reply(pieces=["fresh ", "answer"]))
    first = spawn(own_env, "s1", concurrency=4)
    job = own_client.submit_chat(USER, model=model, stream=True)
    reader = job.stream(timeout=60)
    shown = [next(reader) for _ in range(3)]
    assert shown
    first.signal(signal.SIGTERM)
    assert first.wait(timeout=20) == 0
    second = spawn(own_env, "s2", concurrency=4)
    with pytest.raises(StreamRestarted) as caught:
        list(reader)
    assert caught.value.attempt == 2
    again = [c["choices"][0]["delta"].get("content", "") for c in job.stream(timeout=30)
             if c.get("choices")]
    assert "".join(again) == "fresh answer"
    response = job.result(timeout=10)
    assert response is not None
    assert response["choices"][0]["message"]["content"] == "fresh answer"
    types = [(e["type"], e["attempt"]) for e in job.events(timeout=5)]
    assert ("reset", 2) in types and types[-1] == ("done", 2)
    assert types.index(("reset", 2)) > max(i for i, t in enumerate(types) if t[1] == 1)
    assert "crashes" not in job.info()  # a clean shutdown is not counted against the job
    counted = outcomes(lambda: [first.log(), second.log()], [job.id])
    assert counted == [1]
    figures.add("SIGTERM mid-stream: the stream restarts as an announced attempt", 1,
                counted.count(0), 0, len(fake.requests(model)) - 1)



def test_the_command_lines_log_level_is_honoured_or_overridden_out_loud(
        own_env: dict[str, str], workdir: Path) -> None:
    plain = {k: v for k, v in own_env.items() if k != "API_TASKS_LOG_LEVEL"}
    debug = WorkerProcess(plain, workdir / f"lv-{uuid.uuid4().hex[:6]}.log", concurrency=2,
                          name="lv1", extra=("-l", "DEBUG")).start()
    try:
        wait_until(lambda: "DEBUG/MainProcess]" in debug.log(), 10, "DEBUG lines")
    finally:
        debug.stop()
    quiet = WorkerProcess({**plain, "API_TASKS_LOG_LEVEL": "WARNING"},
                          workdir / f"lv-{uuid.uuid4().hex[:6]}.log", concurrency=2,
                          name="lv2", extra=("-l", "DEBUG")).start(wait=False)
    try:
        said = "log level WARNING from worker.log_level (settings file or API_TASKS_LOG_LEVEL) " \
               "overrides the command line's -l DEBUG"
        wait_until(lambda: said in quiet.log(), 30, "the override to be said")
        assert "DEBUG/MainProcess]" not in quiet.log().split(said, 1)[1]
    finally:
        quiet.stop()
