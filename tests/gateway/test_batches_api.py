"""OpenAI's Batches API on the gateway through the official SDK: a batch from an uploaded
file runs to completed with every line once, a bad file ends failed naming its lines, a cancel
keeps what finished, and batches belong to their key."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import redis
import yaml

from api_tasks.client import Client
from api_tasks.record.keys import Keys
from tests.conftest import GATEWAY_KEY as KEY
from tests.conftest import GATEWAY_OTHER_KEY as OTHER_KEY
from tests.conftest import start_gateway
from tests.support.fake_upstream import FakeUpstream, HttpError, Reply
from tests.support.scrape import scrape, value, workers_value
from tests.support.services import GatewayProcess, Spawn, WorkerProcess, wait_until

pytestmark = pytest.mark.integration


def _sdk(gateway: GatewayProcess, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=60)


def _line(custom_id: str, model: str, url: str = "/v1/chat/completions",
          **body: Any) -> dict[str, Any]:
    content = {"messages": [{"role": "user", "content": custom_id}]} \
        if url == "/v1/chat/completions" else {"prompt": custom_id}
    return {"custom_id": custom_id, "method": "POST", "url": url,
            "body": {"model": model, **content, **body}}


def _upload(sdk: openai.OpenAI, lines: list[Any]) -> str:
    data = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                   for line in lines).encode()
    return sdk.files.create(file=("input.jsonl", data), purpose="batch").id


def _until_ended(sdk: openai.OpenAI, batch_id: str, timeout: float = 60) -> Any:
    seen: list[str] = []

    def ended() -> Any:
        batch = sdk.batches.retrieve(batch_id)
        if not seen or seen[-1] != batch.status:
            seen.append(batch.status)
        return batch if batch.status in ("completed", "failed", "cancelled", "expired") \
            else None
    batch = wait_until(ended, timeout, f"batch {batch_id} to end", interval=0.1)
    return batch, seen


def _jsonl(sdk: openai.OpenAI, file_id: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in sdk.files.content(file_id).text.splitlines()]


def test_a_batch_runs_to_completed_with_every_line_once(
        gateway: GatewayProcess, client: Client, fake: FakeUpstream, model: str) -> None:
    bad = model + "-bad"
    fake.script(bad, HttpError(400, error={"message": "no", "code": "bad_line"}))
    sdk = _sdk(gateway)
    counted = {outcome: workers_value(client, "api_tasks_batch_lines_total", outcome=outcome)
               for outcome in ("completed", "failed")}
    lines = [_line(f"r{i}", bad if i % 3 == 0 else model) for i in range(30)]
    made = sdk.batches.create(input_file_id=_upload(sdk, lines), endpoint="/v1/chat/completions",
                              completion_window="24h", metadata={"run": "nightly"})
    assert (made.status, made.object, made.metadata, made.endpoint) == (
        "validating", "batch", {"run": "nightly"}, "/v1/chat/completions")
    # the cluster's gauge, read from Redis by whichever process is scraped: the gateway here
    running = value(scrape(gateway.url + "/metrics"), "api_tasks_batches_running")
    assert running >= 1
    batch, seen = _until_ended(sdk, made.id)
    wait_until(lambda: value(scrape(gateway.url + "/metrics"), "api_tasks_batches_running")
               <= running - 1, 10, "the batch no longer counted as running")
    assert batch.status == "completed", (batch, seen)
    assert batch.request_counts.model_dump() == {"total": 30, "completed": 20, "failed": 10}
    assert batch.model == bad and batch.errors is None
    assert batch.created_at <= batch.in_progress_at <= batch.finalizing_at <= \
        batch.completed_at <= time.time() + 1
    assert batch.usage is not None and batch.usage.total_tokens > 0
    output, errors = _jsonl(sdk, batch.output_file_id), _jsonl(sdk, batch.error_file_id)
    assert sorted(line["custom_id"] for line in output) == sorted(
        f"r{i}" for i in range(30) if i % 3)
    assert all(line["response"]["status_code"] == 200 and line["error"] is None and
               line["response"]["body"]["object"] == "chat.completion" for line in output)
    assert sorted(line["custom_id"] for line in errors) == sorted(
        f"r{i}" for i in range(0, 30, 3))
    assert {line["response"]["status_code"] for line in errors} == {400}
    assert len(fake.requests(model)) == 20 and len(fake.requests(bad)) == 10  # each once
    out = sdk.files.retrieve(batch.output_file_id)
    assert (out.purpose, out.bytes) == ("batch_output", len(
        sdk.files.content(batch.output_file_id).content))
    assert made.id in [b.id for b in sdk.batches.list(limit=1)]  # auto-paging, newest first
    # the workers counted each line once, by its outcome
    assert {outcome: workers_value(client, "api_tasks_batch_lines_total", outcome=outcome)
            - before for outcome, before in counted.items()} == {"completed": 20, "failed": 10}


def test_a_bad_input_file_ends_failed_naming_each_line_and_runs_nothing(
        gateway: GatewayProcess, fake: FakeUpstream, model: str) -> None:
    sdk = _sdk(gateway)
    lines = [_line("a", model), "{not json", _line("a", model),
             _line("c", model, url="/v1/completions"), _line("d", model, temperature=9),
             _line("e", model)]
    made = sdk.batches.create(input_file_id=_upload(sdk, lines), endpoint="/v1/chat/completions",
                              completion_window="24h")
    batch, _ = _until_ended(sdk, made.id)
    assert batch.status == "failed" and batch.failed_at is not None
    assert [(e.line, e.code, e.param) for e in batch.errors.data] == [
        (2, "invalid_request", None), (3, "duplicate_custom_id", "custom_id"),
        (4, "mismatched_endpoint", "url"), (5, "invalid_request", "body.temperature")]
    assert batch.output_file_id is None and fake.requests(model) == []


def test_a_cancelled_batch_keeps_what_finished_and_accounts_for_every_line(
        gateway: GatewayProcess, fake: FakeUpstream, model: str) -> None:
    fake.script(model, Reply(content="slow", delay=0.3))
    sdk = _sdk(gateway)
    made = sdk.batches.create(input_file_id=_upload(sdk, [_line(f"c{i}", model)
                                                          for i in range(40)]),
                              endpoint="/v1/chat/completions", completion_window="24h")
    wait_until(lambda: sdk.batches.retrieve(made.id).request_counts.completed >= 2, 30,
               "a few lines to finish")
    cancelling = sdk.batches.cancel(made.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    batch, _ = _until_ended(sdk, made.id)
    assert batch.status == "cancelled"
    counts = batch.request_counts
    assert counts.total == 40 and counts.completed + counts.failed == 40
    assert 2 <= counts.completed < 40
    output, errors = _jsonl(sdk, batch.output_file_id), _jsonl(sdk, batch.error_file_id)
    assert len(output) == counts.completed and len(errors) == counts.failed
    assert sorted(line["custom_id"] for line in output + errors) == sorted(
        f"c{i}" for i in range(40))
    assert len(fake.requests(model)) == counts.completed  # the unsent never ran
    with pytest.raises(openai.ConflictError):
        sdk.batches.cancel(_until_ended(sdk, sdk.batches.create(
            input_file_id=_upload(sdk, [_line("x", model + "-quick")]),
            endpoint="/v1/chat/completions", completion_window="24h").id)[0].id)


def test_batch_create_refuses_bad_requests_and_batches_belong_to_their_key(
        gateway: GatewayProcess, model: str) -> None:
    sdk, other = _sdk(gateway), _sdk(gateway, OTHER_KEY)
    file_id = _upload(sdk, [_line("a", model)])
    good = {"input_file_id": file_id, "endpoint": "/v1/chat/completions",
            "completion_window": "24h"}
    for change, error, param in [
            ({"input_file_id": "file-nope"}, openai.NotFoundError, "input_file_id"),
            ({"endpoint": "/v1/moderations"}, openai.BadRequestError, "endpoint"),
            ({"completion_window": "1h"}, openai.BadRequestError, "completion_window"),
            ({"metadata": {f"k{i}": "v" for i in range(17)}}, openai.BadRequestError,
             "metadata")]:
        with pytest.raises(error) as caught:
            sdk.batches.create(**{**good, **change})  # type: ignore[arg-type]
        assert caught.value.body["param"] == param  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):  # another key's file
        other.batches.create(**good)  # type: ignore[arg-type]
    made = sdk.batches.create(**good)  # type: ignore[arg-type]
    for attempt in (lambda: other.batches.retrieve(made.id),
                    lambda: other.batches.cancel(made.id)):
        with pytest.raises(openai.NotFoundError):
            attempt()
    assert made.id not in [b.id for b in other.batches.list()]
    _until_ended(sdk, made.id)


@pytest.fixture(scope="module")
def short_gateway(worker_env: dict[str, str], workdir: Path,
                  worker: WorkerProcess) -> Iterator[GatewayProcess]:
    """A gateway whose batches expire 2 s after they are made."""
    process = start_gateway(worker_env, workdir, "short-gateway",
                            lambda config: config["gateway"].update(batch_lifetime=2))
    yield process
    process.stop()


def test_a_batch_past_its_window_expires_keeping_what_finished(
        short_gateway: GatewayProcess, fake: FakeUpstream, model: str) -> None:
    fake.script(model, Reply(content="slow", delay=0.4))
    sdk = _sdk(short_gateway)
    made = sdk.batches.create(input_file_id=_upload(sdk, [_line(f"x{i}", model)
                                                          for i in range(40)]),
                              endpoint="/v1/chat/completions", completion_window="24h")
    assert made.expires_at == pytest.approx(made.created_at + 2, abs=1)
    batch, _ = _until_ended(sdk, made.id)
    assert batch.status == "expired" and batch.expired_at and batch.cancelled_at is None
    counts = batch.request_counts
    assert counts.total == 40 and counts.completed + counts.failed == 40 and counts.failed
    output, errors = _jsonl(sdk, batch.output_file_id), _jsonl(sdk, batch.error_file_id)
    assert len(output) == counts.completed
    assert {line["error"]["code"] for line in errors} == {"batch_expired"}
    assert sorted(line["custom_id"] for line in output + errors) == sorted(
        f"x{i}" for i in range(40))


@pytest.mark.faults
def test_a_worker_killed_mid_batch_loses_no_line_and_records_none_twice(
        worker_env: dict[str, str], workdir: Path, fake: FakeUpstream, spawn: Spawn,
        model: str) -> None:
    """Two workers of their own (short leases) run an API batch; one is SIGKILLed mid-run."""
    config = workdir / f"killed-{model}.yaml"
    config.write_text(yaml.safe_dump({
        "worker": {"lease_ttl": 2, "reap_interval": 0.5, "watchdog_interval": 0.2,
                   "visibility_timeout": 3600, "shutdown_grace": 3},
        # a message popped by the killed worker but not yet recorded as unacked is lost
        # (RELIABILITY.md): the batch sends it again after this long, not the default 120 s
        "jobs": {"batch_resend_after": 2},
        "gateway": {"batch_window": 6, "keys": [{"name": "main", "key_env": "GW_MAIN_KEY"}]},
        "upstreams": [{"name": "fake", "base_url": fake.base_url, "models": ["*"],
                       "timeouts": {"connect": 2, "read": 30, "total": 60}}]}))
    env = {**worker_env, "API_TASKS_CONFIG": str(config), "GW_MAIN_KEY": KEY,
           "API_TASKS_PREFIX": f"kb{model[2:8]}"}
    fake.script(model, Reply(content="slow", delay=0.3))
    doomed, survivor = spawn(env, "doomed"), spawn(env, "survivor")
    gateway_env = {k: v for k, v in env.items() if k != "FAKE_UPSTREAM_KEY"}
    gateway = GatewayProcess(gateway_env, workdir / f"killed-{model}.log").start()
    try:
        sdk = _sdk(gateway)
        made = sdk.batches.create(input_file_id=_upload(sdk, [_line(f"k{i}", model)
                                                              for i in range(60)]),
                                  endpoint="/v1/chat/completions", completion_window="24h")
        wait_until(lambda: sdk.batches.retrieve(made.id).request_counts.completed >= 10, 60,
                   "a sixth of the batch to finish")
        doomed.kill()
        batch, _ = _until_ended(sdk, made.id, timeout=120)
        assert batch.status == "completed", batch
        assert batch.request_counts.model_dump() == {"total": 60, "completed": 60, "failed": 0}
        output = _jsonl(sdk, batch.output_file_id)
        assert sorted(line["custom_id"] for line in output) == sorted(f"k{i}" for i in range(60))
        assert batch.error_file_id is None
        assert survivor.proc is not None and survivor.proc.poll() is None
    finally:
        gateway.stop()


@pytest.mark.parametrize("url", ["/v1/embeddings", "/v1/responses"])
def test_embeddings_and_responses_batches(gateway: GatewayProcess, fake: FakeUpstream,
                                          model: str, url: str) -> None:
    sdk = _sdk(gateway)
    lines = [{"custom_id": f"e{i}", "method": "POST", "url": url,
              "body": {"model": model, "input": f"text number {i}"}} for i in range(12)]
    made = sdk.batches.create(input_file_id=_upload(sdk, lines), endpoint=url,  # type: ignore[arg-type]
                              completion_window="24h")
    batch, seen = _until_ended(sdk, made.id)
    assert batch.status == "completed", (batch, seen)
    assert batch.request_counts.model_dump() == {"total": 12, "completed": 12, "failed": 0}
    output = _jsonl(sdk, batch.output_file_id)
    assert sorted(line["custom_id"] for line in output) == sorted(f"e{i}" for i in range(12))
    bodies = {line["custom_id"]: line["response"]["body"] for line in output}
    if url == "/v1/embeddings":
        assert all(body["object"] == "list" and body["data"][0]["embedding"]
                   for body in bodies.values())
        assert batch.usage.input_tokens == batch.usage.total_tokens == 3 * 12
    else:
        assert bodies["e5"]["output"][0]["content"][0]["text"] == "echo: text number 5"
        assert batch.usage.output_tokens == 4 * 12
    assert {r.path for r in fake.requests(model)} == {url}
    # a line of another endpoint than the batch's fails the batch, naming it
    mixed = [*lines[:2], _line("chat", model)]
    refused = sdk.batches.create(input_file_id=_upload(sdk, mixed), endpoint=url,  # type: ignore[arg-type]
                                 completion_window="24h")
    failed, _ = _until_ended(sdk, refused.id)
    assert failed.status == "failed"
    assert [(e.code, e.line) for e in failed.errors.data] == [("mismatched_endpoint", 3)]


@pytest.fixture(scope="module")
def wide_gateway(worker_env: dict[str, str], workdir: Path,
                 worker: WorkerProcess) -> Iterator[GatewayProcess]:
    """A gateway whose batches keep up to 100 jobs queued or running."""
    process = start_gateway(worker_env, workdir, "wide-gateway",
                            lambda config: config["gateway"].update(batch_window=100))
    yield process
    process.stop()


def test_a_batch_reads_its_lines_from_its_file_and_keeps_no_copy(
        wide_gateway: GatewayProcess, fake: FakeUpstream, redis_client: redis.Redis,
        model: str) -> None:
    fake.script(model, Reply(delay=0.4))  # echoes each line's message
    sdk = _sdk(wide_gateway)
    texts = {f"c{i}": f"line {i} " + "w" * (i * 7919 % 9000) for i in range(600)}
    lines: list[Any] = []
    for number, (custom_id, content) in enumerate(texts.items()):
        lines += ["   "] if number % 50 == 49 else []  # blank lines are skipped, not lines
        lines.append({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                      "body": {"model": model,
                               "messages": [{"role": "user", "content": content}]}})
    source = _upload(sdk, lines)
    size = sdk.files.retrieve(source).bytes
    assert size > 2 * 1024 * 1024  # its lines cross the file's 1 MiB pieces
    made = sdk.batches.create(input_file_id=source, endpoint="/v1/chat/completions",
                              completion_window="24h")
    wait_until(lambda: sdk.batches.retrieve(made.id).status == "in_progress", 30,
               "the batch to start")
    prefix = wide_gateway.env["API_TASKS_PREFIX"]
    # its input is where every 256th line starts in the file, not a copy of the file
    keys = Keys(prefix, int(wide_gateway.env.get("API_TASKS_REDIS_SHARDS", "1")))
    assert redis_client.llen(keys.batch_input(made.id)) == 3
    held = sum(redis_client.memory_usage(key) or 0
               for key in redis_client.scan_iter(f"{keys.batch(made.id)}*"))
    assert held < size / 10, (held, size)
    batch, seen = _until_ended(sdk, made.id, timeout=120)
    assert batch.status == "completed", (batch, seen)
    assert batch.request_counts.model_dump() == {"total": 600, "completed": 600, "failed": 0}
    output = _jsonl(sdk, batch.output_file_id)
    answers = {line["custom_id"]: line["response"]["body"]["choices"][0]["message"]["content"]
               for line in output}
    assert len(output) == len(answers) == 600
    assert answers == {custom_id: "echo: " + content for custom_id, content in texts.items()}
    # each line's output holds its response: the job keeps only its status, not its result
    assert not any(redis_client.exists(keys.result(f"{made.id}-{i}")) for i in range(600))
    assert all(redis_client.hgetall(keys.job(f"{made.id}-{i}")) == {b"status": b"succeeded"}
               and redis_client.ttl(keys.job(f"{made.id}-{i}")) > 3600
               for i in (0, 299, 599))


def test_deleting_a_running_batchs_input_file_fails_the_lines_not_yet_sent(
        gateway: GatewayProcess, fake: FakeUpstream, model: str) -> None:
    fake.script(model, Reply(content="slow", delay=0.3))
    sdk = _sdk(gateway)
    source = _upload(sdk, [_line(f"d{i}", model) for i in range(40)])
    made = sdk.batches.create(input_file_id=source, endpoint="/v1/chat/completions",
                              completion_window="24h")
    wait_until(lambda: sdk.batches.retrieve(made.id).request_counts.completed >= 1, 30,
               "a line to finish")
    assert sdk.files.delete(source).deleted
    batch, _ = _until_ended(sdk, made.id)
    assert batch.status == "completed"  # it ends: nothing waits for lines it cannot read
    counts = batch.request_counts
    assert counts.total == 40 and counts.completed + counts.failed == 40 and counts.failed
    errors = _jsonl(sdk, batch.error_file_id)
    assert len(errors) == counts.failed
    assert {line["error"]["code"] for line in errors} == {"input_missing"}
    output = _jsonl(sdk, batch.output_file_id)
    assert sorted(line["custom_id"] for line in output) == sorted(
        f"d{i}" for i in range(counts.completed))  # sent in order: the first lines ran


def test_a_file_opening_with_a_byte_order_mark_runs(gateway: GatewayProcess,
                                                    model: str) -> None:
    sdk = _sdk(gateway)
    data = b"\xef\xbb\xbf" + "".join(json.dumps(_line(f"b{i}", model)) + "\r\n"
                                     for i in range(3)).encode()
    source = sdk.files.create(file=("bom.jsonl", data), purpose="batch").id
    made = sdk.batches.create(input_file_id=source, endpoint="/v1/chat/completions",
                              completion_window="24h")
    batch, seen = _until_ended(sdk, made.id)
    assert batch.status == "completed", (batch, seen)
    assert sorted(line["custom_id"] for line in _jsonl(sdk, batch.output_file_id)) == [
        "b0", "b1", "b2"]


def test_a_batchs_input_file_bytes_outlast_a_shorter_file_expiry(
        gateway: GatewayProcess, client: Client, fake: FakeUpstream, model: str) -> None:
    sdk = _sdk(gateway)
    data = (json.dumps(_line("x", model)) + "\n").encode()
    source = sdk.files.create(file=("input.jsonl", data), purpose="batch",
                              expires_after={"anchor": "created_at", "seconds": 3600}).id
    assert client.redis.ttl(client.keys.file_data(source)) <= 3600
    made = sdk.batches.create(input_file_id=source, endpoint="/v1/chat/completions",
                              completion_window="24h")
    # once it starts, the bytes it reads its lines from are kept past its 24 h window
    wait_until(lambda: client.redis.ttl(client.keys.file_data(source)) > 24 * 3600, 30,
               "the input file's bytes kept for the batch")
    batch, _ = _until_ended(sdk, made.id)
    assert batch.status == "completed"
