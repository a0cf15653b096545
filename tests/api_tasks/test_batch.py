"""Batch runs in the OpenAI Batch file format: check first, run windowed, resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from api_tasks.batches.attached import run_batch
from api_tasks.batches.lines import check_file
from api_tasks.client import Client
from tests.support.fake_upstream import FakeUpstream, HttpError, Slow
from tests.support.services import ROOT, WorkerProcess, default_sigint, wait_until

pytestmark = pytest.mark.integration


def _line(custom_id: str, model: str, chat: bool = True, **body: Any) -> str:
    if chat:
        request = {"url": "/v1/chat/completions",
                   "body": {"model": model, "messages": [{"role": "user", "content": custom_id}],
                            **body}}
    else:
        request = {"url": "/v1/completions", "body": {"model": model, "prompt": custom_id, **body}}
    return json.dumps({"custom_id": custom_id, "method": "POST", **request})


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(text) for text in path.read_text().splitlines() if text.strip()]


def test_every_bad_line_is_reported_with_its_number_before_anything_is_sent(
        tmp_path: Path, worker_env: dict[str, str], worker: WorkerProcess,
        fake: FakeUpstream, model: str) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join([
        _line("a", model), "{not json", _line("b", model),
        json.dumps({"custom_id": "c", "method": "POST", "url": "/v1/embeddings", "body": {}}),
        _line("a", model), json.dumps({"custom_id": "d", "url": "/v1/chat/completions",
                                       "body": {"model": model, "messages": []}}),
        json.dumps({"custom_id": "e", "url": "/v1/chat/completions", "body": {  # not its say
            "model": model, "messages": [{"role": "user", "content": "x"}],
            "owner": "main"}})]) + "\n")
    problems, lines = check_file(source, 4 * 1024 * 1024)
    assert lines == 7
    assert [p.split(":")[0] for p in problems] == ["line 2", "line 4", "line 5", "line 6",
                                                   "line 7"]
    assert "body.messages" in problems[3] and "body.owner" in problems[4]
    assert problems[2] == "line 5: custom_id 'a' is already used on line 1"
    env = {k: v for k, v in worker_env.items() if k != "FAKE_UPSTREAM_KEY"}
    done = subprocess.run([sys.executable, "-m", "api_tasks", "batch", "run", str(source), "-o",
                           str(tmp_path / "out.jsonl")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "line 4" in done.stderr
    assert fake.requests(model) == []


def test_run_writes_openai_batch_results_and_errors(client: Client, fake: FakeUpstream,
                                                   tmp_path: Path, model: str) -> None:
    fake.script(model + "-bad", HttpError(400, error={"message": "nope", "code": "bad"}))
    source = tmp_path / "in.jsonl"
    lines = [_line(f"chat-{i}", model) for i in range(12)]
    lines += [_line(f"cmpl-{i}", model, chat=False) for i in range(6)]
    lines += [_line("broken", model + "-bad")]
    source.write_text("\n".join(lines) + "\n")
    output, errors = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    summary = run_batch(client, source, output, errors, window=5)
    assert (summary.total, summary.completed, summary.failed) == (19, 18, 1)
    assert summary.usage["total_tokens"] > 0
    results = {r["custom_id"]: r for r in _records(output)}
    assert len(results) == 18
    record = results["chat-3"]
    assert record["error"] is None and record["response"]["status_code"] == 200
    assert record["response"]["body"]["choices"][0]["message"]["content"] == "echo: chat-3"
    assert results["cmpl-2"]["response"]["body"]["choices"][0]["text"] == "echo: cmpl-2"
    [failed] = _records(errors)
    assert failed["custom_id"] == "broken" and failed["error"]["code"] == "bad"
    assert failed["response"]["status_code"] == 400


def test_a_run_whose_output_lost_lines_collects_them_again_without_calls(
        client: Client, fake: FakeUpstream, tmp_path: Path, model: str) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(_line(f"r-{i}", model) for i in range(20)) + "\n")
    output, errors = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    run_batch(client, source, output, errors, window=4)
    kept = output.read_text().splitlines()[:8]
    # as if the run had died while writing its ninth line
    output.write_text("\n".join(kept) + "\n" + kept[0][:20])
    fake_calls = len(fake.requests(model))
    summary = run_batch(client, source, output, errors, window=4)
    assert summary.skipped == 8 and summary.completed == 12 and summary.collected == 12
    ids = [r["custom_id"] for r in _records(output)]
    assert sorted(ids) == sorted(f"r-{i}" for i in range(20))
    assert len(fake.requests(model)) == fake_calls == 20, "the 12 ended jobs were collected"


def test_a_run_again_after_the_output_was_deleted_says_it_collected_and_fresh_calls_again(
        tmp_path: Path, worker_env: dict[str, str], worker: WorkerProcess, fake: FakeUpstream,
        model: str) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(_line(f"f-{i}", model) for i in range(6)) + "\n")
    output = tmp_path / "out.jsonl"
    env = {k: v for k, v in worker_env.items() if k != "FAKE_UPSTREAM_KEY"}
    command = [sys.executable, "-m", "api_tasks", "batch", "run", str(source), "-o", str(output)]
    first = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=60)
    assert first.returncode == 0 and "collected" not in first.stderr, first.stderr
    assert len(fake.requests(model)) == 6
    output.unlink()
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 0, again.stderr
    assert "6 completed, 0 failed (6 of them collected from an earlier run's jobs" in again.stderr
    assert len(_records(output)) == 6 and len(fake.requests(model)) == 6  # no new call
    output.unlink()
    fresh = subprocess.run([*command, "--fresh"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=60)
    assert fresh.returncode == 0 and "collected" not in fresh.stderr, fresh.stderr
    assert len(_records(output)) == 6 and len(fake.requests(model)) == 12  # each called anew
    assert fresh.stderr.count("batch: 6 done") == 1  # the last progress line, once
    assert 'usage {"' in fresh.stderr  # JSON, not a Python dict


def test_a_run_stopped_with_ctrl_c_resumes_without_a_duplicate_line_or_call(
        tmp_path: Path, worker_env: dict[str, str], worker: WorkerProcess, fake: FakeUpstream,
        model: str) -> None:
    fake.script(model, Slow(0.3))
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(_line(f"c-{i}", model) for i in range(24)) + "\n")
    output = tmp_path / "out.jsonl"
    env = {k: v for k, v in worker_env.items() if k != "FAKE_UPSTREAM_KEY"}
    command = [sys.executable, "-m", "api_tasks", "batch", "run", str(source), "-o", str(output),
               "--window", "6"]
    run = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True,
                           preexec_fn=default_sigint)
    wait_until(lambda: output.exists() and len(output.read_text().splitlines()) >= 6, 30,
               "some results")
    run.send_signal(signal.SIGINT)  # with jobs in flight
    _, stderr = run.communicate(timeout=30)
    assert run.returncode == 130 and "run the same command again to resume" in stderr
    first = len(_records(output))
    assert first < 24
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    ids = [r["custom_id"] for r in _records(output)]
    assert sorted(ids) == sorted(f"c-{i}" for i in range(24)), "every line once"
    prompts = [r.body["messages"][0]["content"] for r in fake.requests(model) if r.body]
    assert sorted(prompts) == sorted(f"c-{i}" for i in range(24)), "every line called once"


def test_cli_batch_run_logs_progress_when_not_on_a_terminal(
        tmp_path: Path, worker_env: dict[str, str], worker: WorkerProcess, model: str) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(_line(f"cli-{i}", model) for i in range(5)) + "\n")
    env = {k: v for k, v in worker_env.items() if k != "FAKE_UPSTREAM_KEY"}
    done = subprocess.run([sys.executable, "-m", "api_tasks", "batch", "run", str(source), "-o",
                           str(tmp_path / "out.jsonl")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "batch: 5 done, 0 failed" in done.stderr and "5 completed" in done.stderr
    assert len(_records(tmp_path / "out.jsonl")) == 5
    assert (tmp_path / "out.errors.jsonl").read_text() == ""
