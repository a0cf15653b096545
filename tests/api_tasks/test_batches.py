"""Detached batches: uploaded, run by the workers in a window, read back, cancelled."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from api_tasks import Batch, BatchNotFound, InvalidBatch
from api_tasks.batches.detached import MAX_WINDOW
from api_tasks.batches.lines import line_params
from api_tasks.batches.pump import BatchPump
from api_tasks.client import Client
from config.loader import load_settings
from tests.api_tasks.test_batch import _line
from tests.support.fake_upstream import FakeUpstream, HttpError, Slow
from tests.support.services import ROOT, Spawn, WorkerProcess

pytestmark = pytest.mark.integration


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _outstanding_peak(client: Client, batch: Batch, stop: threading.Event) -> list[int]:
    """Sample how many of the batch's jobs are queued or running, until ``stop``."""
    peak = [0]

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], int(client.redis.hlen(client.keys.batch_jobs(batch.id))))
            stop.wait(0.005)
    threading.Thread(target=sample, daemon=True).start()
    return peak


def test_a_detached_batch_runs_in_a_window_and_reports_counts_and_usage(
        client: Client, fake: FakeUpstream, tmp_path: Path, model: str) -> None:
    fake.script(model, Slow(0.05))
    fake.script(model + "-bad", HttpError(400, error={"message": "nope", "code": "bad"}))
    lines = [_line(f"chat-{i}", model) for i in range(14)]
    lines += [_line(f"cmpl-{i}", model, chat=False) for i in range(6)]
    lines += [_line("broken", model + "-bad")]
    batch = client.submit_batch(_write(tmp_path / "in.jsonl", lines), window=3)
    stop = threading.Event()
    peak = _outstanding_peak(client, batch, stop)
    state = batch.wait(timeout=60, poll=0.05)
    stop.set()
    assert state["status"] == "completed"
    assert (state["total"], state["sent"], state["completed"], state["failed"]) == (21, 21, 20, 1)
    assert 1 <= peak[0] <= 3, "never more than the window queued or running at once"
    results = {r["custom_id"]: r for r in batch.records()}
    assert sorted(results) == sorted([f"chat-{i}" for i in range(14)] +
                                     [f"cmpl-{i}" for i in range(6)])
    assert results["chat-4"]["response"]["body"]["choices"][0]["message"]["content"] == \
        "echo: chat-4"
    assert results["cmpl-5"]["response"]["body"]["choices"][0]["text"] == "echo: cmpl-5"
    assert state["usage"]["total_tokens"] == sum(
        r["response"]["body"]["usage"]["total_tokens"] for r in results.values())
    [failed] = batch.records(errors=True)
    assert failed["custom_id"] == "broken" and failed["error"]["code"] == "bad"
    assert len(fake.requests(model)) == 20
    assert client.redis.exists(client.keys.batch_input(batch.id)) == 0, "input dropped at end"
    assert client.redis.ttl(client.keys.batch_output(batch.id)) > 0


def test_a_bad_file_is_refused_whole_with_line_numbers(client: Client, tmp_path: Path,
                                                       model: str) -> None:
    source = _write(tmp_path / "in.jsonl", [_line("a", model), "{", _line("a", model)])
    with pytest.raises(InvalidBatch) as refused:
        client.submit_batch(source)
    assert [p.split(":")[0] for p in refused.value.problems] == ["line 2", "line 3"]
    with pytest.raises(BatchNotFound):
        client.get_batch("batch_nope")


def test_cancel_stops_new_sends_at_once_and_keeps_what_finished(
        client: Client, fake: FakeUpstream, tmp_path: Path, model: str) -> None:
    fake.script(model, Slow(0.6))
    total = 1_100  # the lines never sent are recorded in chunks of 500
    batch = client.submit_batch(
        _write(tmp_path / "in.jsonl", [_line(f"c-{i}", model) for i in range(total)]), window=4)
    fake.wait_for_requests(model, 2, timeout=20)
    assert batch.cancel() == "cancelling"
    sent_at_cancel = batch.status()["sent"]
    state = batch.wait(timeout=30, poll=0.05)
    assert state["status"] == "cancelled"
    assert len(fake.requests(model)) == state["completed"] <= sent_at_cancel <= 4 + 4, \
        "nothing was sent after the cancel"
    assert state["completed"] >= 2, "calls in flight were let finish"
    # every line ends in exactly one file, and the counts add up
    assert state["completed"] + state["cancelled"] + state["failed"] == state["total"] == total
    done, cancelled = list(batch.records()), list(batch.records(errors=True))
    assert len(done) == state["completed"] and len(cancelled) == state["cancelled"]
    assert sorted(r["custom_id"] for r in done + cancelled) == sorted(f"c-{i}"
                                                                      for i in range(total))
    assert all(r["error"]["code"] == "cancelled" for r in cancelled)
    assert batch.cancel() == "cancelled"


class _Stepper:
    """Plays a batch's stepper by hand: holds its lock so no worker steps it meanwhile."""

    def __init__(self, client: Client, tmp_path: Path, lines: list[str]) -> None:
        self.client = client
        self.batch = Batch(client, f"batch_{uuid.uuid4().hex}")
        self.lock = client.keys.batch_lock(self.batch.id)
        assert client.redis.set(self.lock, "test", px=20_000)
        self.batch.upload(_write(tmp_path / "in.jsonl", lines), 3, "bulk")
        self.pump = BatchPump(client, client.redis)

    def take(self, count: int) -> list[str]:
        jobs = [f"{self.batch.id}-{i}" for i in range(count)]
        pairs = [x for i, job in enumerate(jobs) for x in (job, f"d-{i}")]
        keys = self.client.keys
        assert self.pump._scripts["take"](
            keys=[keys.batch(self.batch.id), keys.batch_jobs(self.batch.id),
                  keys.batch_input(self.batch.id)], args=["0", 60, *pairs])
        return jobs

    def mark_sent(self, jobs: list[str]) -> None:
        self.pump._scripts["mark"](keys=[self.client.keys.batch_jobs(self.batch.id)], args=jobs)

    def die(self) -> None:
        self.client.redis.delete(self.lock)


def _prompts(fake: FakeUpstream, model: str) -> list[str]:
    return sorted(r.body["messages"][0]["content"] for r in fake.requests(model)
                  if r.body is not None)


def test_lines_taken_by_a_stepper_that_died_before_marking_them_sent_are_sent_once(
        client: Client, fake: FakeUpstream, tmp_path: Path, model: str) -> None:
    stepper = _Stepper(client, tmp_path, [_line(f"d-{i}", model) for i in range(6)])
    taken = stepper.take(3)
    client.submit("chat", [{"role": "user", "content": "d-0"}],
                  {"model": model, "queue": "bulk"}, job_id=taken[0])  # sent one, then died
    stepper.die()
    state = stepper.batch.wait(timeout=30, poll=0.05)
    assert (state["status"], state["completed"], state["failed"]) == ("completed", 6, 0)
    assert _prompts(fake, model) == [f"d-{i}" for i in range(6)], "each line called once"
    assert sorted(r["custom_id"] for r in stepper.batch.records()) == \
        [f"d-{i}" for i in range(6)]


def test_a_sent_line_whose_job_record_is_gone_fails_and_is_not_sent_again(
        client: Client, fake: FakeUpstream, tmp_path: Path, model: str) -> None:
    stepper = _Stepper(client, tmp_path, [_line(f"d-{i}", model) for i in range(5)])
    stepper.mark_sent(stepper.take(2))  # as if sent, and their records expired since
    stepper.die()
    state = stepper.batch.wait(timeout=30, poll=0.05)
    assert (state["completed"], state["failed"]) == (3, 2)
    assert _prompts(fake, model) == ["d-2", "d-3", "d-4"], "no line called twice"
    codes = {r["custom_id"]: r["error"]["code"] for r in stepper.batch.records(errors=True)}
    assert codes == {"d-0": "result_missing", "d-1": "result_missing"}


def test_a_batch_cancelled_while_uploading_sends_nothing(
        client: Client, fake: FakeUpstream, tmp_path: Path, model: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("api_tasks.batches.detached._UPLOAD_LINES", 2)
    batch = Batch(client, f"batch_{uuid.uuid4().hex}")
    push = Batch._push

    def push_then_cancel(self: Batch, key: str, lines: str, chunk: list[str]) -> int:
        count = push(self, key, lines, chunk)
        assert self.cancel() == "cancelled"  # at once: nothing was sent
        return count
    monkeypatch.setattr(Batch, "_push", push_then_cancel)
    batch.upload(_write(tmp_path / "in.jsonl", [_line(f"u-{i}", model) for i in range(5)]),
                 3, "bulk")
    state = batch.status()
    assert (state["status"], state["sent"]) == ("cancelled", 0)
    assert not client.redis.sismember(client.keys.batches(client.keys.shard(batch.id)), batch.id)
    assert client.redis.exists(client.keys.batch_input(batch.id)) == 0
    assert fake.requests(model) == []


def test_windows_past_the_cap_and_result_ttls_in_lines_are_handled(
        client: Client, tmp_path: Path, model: str) -> None:
    source = _write(tmp_path / "in.jsonl", [_line("a", model)])
    with pytest.raises(InvalidBatch, match="window"):
        client.submit_batch(source, window=MAX_WINDOW + 1)
    _first, params = line_params("chat", {"messages": [], "result_ttl": 1, "queue": "x"}, "bulk")
    assert params == {"queue": "bulk", "store_result": True}


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "api_tasks", "batch", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)


def test_cli_submit_status_results_and_cancel(tmp_path: Path, worker_env: dict[str, str],
                                              worker: WorkerProcess, model: str) -> None:
    env = {k: v for k, v in worker_env.items() if k != "FAKE_UPSTREAM_KEY"}
    source = _write(tmp_path / "in.jsonl", [_line(f"cli-{i}", model) for i in range(5)])
    submitted = _cli(env, "submit", str(source), "--window", "2")
    assert submitted.returncode == 0, submitted.stderr
    batch_id = submitted.stdout.strip()
    assert batch_id.startswith("batch_")
    fetched = _cli(env, "results", batch_id, "-o", str(tmp_path / "out.jsonl"), "--wait")
    assert fetched.returncode == 0, fetched.stderr
    assert "5 result(s)" in fetched.stderr
    records: list[dict[str, Any]] = [json.loads(x) for x in
                                     (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(r["custom_id"] for r in records) == [f"cli-{i}" for i in range(5)]
    status = json.loads(_cli(env, "status", batch_id).stdout)
    assert (status["status"], status["completed"], status["total"]) == ("completed", 5, 5)
    assert status["usage"]["total_tokens"] > 0
    again = _cli(env, "cancel", batch_id)
    assert again.returncode == 1 and "completed" in again.stdout
    bad = _cli(env, "submit", str(_write(tmp_path / "bad.jsonl", ["[]"])))
    assert bad.returncode == 2 and "line 1" in bad.stderr
    missing = _cli(env, "status", "batch_missing")
    assert missing.returncode == 4 and "no batch" in missing.stderr


def test_a_message_lost_by_a_worker_killed_mid_fetch_is_sent_again(
        worker_env: dict[str, str], workdir: Path, fake: FakeUpstream, spawn: Spawn,
        tmp_path: Path, model: str) -> None:
    config = workdir / f"resend-{uuid.uuid4().hex[:6]}.yaml"
    config.write_text(yaml.safe_dump({"upstreams": [{"name": "fake", "base_url": fake.base_url}],
                                      "jobs": {"batch_resend_after": 1}}))
    env = {**worker_env, "API_TASKS_CONFIG": str(config),
           "API_TASKS_PREFIX": f"rs{uuid.uuid4().hex[:6]}"}
    worker = spawn(env, "rs1", concurrency=4)
    client = Client(load_settings(env=env))
    stepper = _Stepper(client, tmp_path, [_line(f"d-{i}", model) for i in range(4)])
    [lost] = stepper.take(1)
    assert client.store.create(lost, {"batch": stepper.batch.id})  # recorded, never delivered
    stepper.mark_sent([lost])
    stepper.die()
    state = stepper.batch.wait(timeout=30, poll=0.1)
    assert (state["status"], state["completed"]) == ("completed", 4)
    assert _prompts(fake, model) == [f"d-{i}" for i in range(4)], "each line called once"
    assert f"job {lost} still queued" in worker.log()  # sent again, once it was due
