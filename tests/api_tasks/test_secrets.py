"""API keys stay in the worker: never in the broker, results, streams, errors or logs."""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from api_tasks import JobFailed
from api_tasks.broker import create_app
from api_tasks.client import Client
from config.loader import load_settings
from tests.conftest import SECRET
from tests.support.fake_upstream import FakeUpstream, Html, HttpError, Reply, StreamError
from tests.support.services import WorkerProcess, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.faults]
USER = [{"role": "user", "content": "Hello"}]


def _dump(client: redis.Redis, key: bytes) -> bytes:
    kind = client.type(key)
    if kind == b"string":
        return client.get(key) or b""
    if kind == b"hash":
        return repr(client.hgetall(key)).encode()
    if kind == b"list":
        return repr(client.lrange(key, 0, -1)).encode()
    if kind == b"stream":
        return repr(client.xrange(key)).encode()
    if kind == b"zset":
        return repr(client.zrange(key, 0, -1)).encode()
    if kind == b"set":
        return repr(client.smembers(key)).encode()
    return b""


def test_key_reaches_the_upstream_and_nothing_else(client: Client, fake: FakeUpstream,
                                                   redis_client: redis.Redis,
                                                   worker: WorkerProcess) -> None:
    fake.script("keyed-leak", Reply(pieces=["a", "b"]),
                HttpError(401, error={"message": f"Incorrect API key provided: {SECRET}",
                                      "type": "invalid_request_error",
                                      "code": "invalid_api_key"}))
    ok = client.submit_chat(USER, model="keyed-leak", stream=True)
    ok.result(timeout=20)
    bad = client.submit_chat(USER, model="keyed-leak")
    with pytest.raises(JobFailed) as caught:
        bad.result(timeout=20)
    assert SECRET not in repr(caught.value.error)
    assert "***" in caught.value.error["message"]
    assert fake.requests("keyed-leak")[0].headers["authorization"] == f"Bearer {SECRET}"
    leaks: list[Any] = [key for key in redis_client.scan_iter(count=1000)
                        if SECRET.encode() in _dump(redis_client, key)]
    assert leaks == []
    assert SECRET not in worker.log()
    assert "DEBUG" in worker.log()  # the log really was at DEBUG level


def _escaped(error: dict[str, str]) -> bytes:
    """An error body whose fields spell the key with a JSON escape (``\\u0073k-...``)."""
    body = json.dumps({"error": {k: v.replace(SECRET, "@") for k, v in error.items()}})
    return body.replace("@", "\\u0073" + SECRET[1:]).encode()


def _echoed_everywhere() -> dict[str, tuple[object, bool]]:
    """Upstream replies that echo the key in every field and form (step, streamed)."""
    every_field = {"message": f"m {SECRET}", "type": f"t {SECRET}", "code": f"c {SECRET}",
                   "param": f"p {SECRET}"}
    return {
        "error-fields": (HttpError(400, error=every_field), False),
        "stream-error-event": (StreamError(after=1, error=every_field), True),
        "stream-error-event-named": (StreamError(after=0, error=every_field, event_line=True),
                                     True),
        "text-body-echoing-headers": (HttpError(
            200, body=f"POST /v1/chat/completions\nAuthorization: Bearer {SECRET}\n".encode(),
            content_type="text/plain"), False),
        "json-200-error": (HttpError(200, body=json.dumps({"error": every_field}).encode()),
                           False),
        # JSON escapes spell the key without its bytes: "\u0073k-..." decodes to "sk-..."
        "error-fields-escaped": (HttpError(400, body=_escaped(every_field)), False),
        "stream-error-escaped": (HttpError(200, body=b"data: " + _escaped(every_field)
                                           + b"\n\n", content_type="text/event-stream"), True),
        "html-title": (Html(status=502, title=f"Bad key {SECRET}"), False),
        "html-200": (HttpError(200, body=f"<html><title>{SECRET}</title></html>".encode(),
                               content_type="text/html"), False),
        "not-json-event": (HttpError(200, body=f"data: {{{SECRET}\n\n".encode(),
                                     content_type="text/event-stream"), True),
        "content": (Reply(content=f"the key is {SECRET}."), False),
        "streamed-content-split": (Reply(pieces=[f"the key is {SECRET}."], split_writes=True),
                                   True),
    }


@pytest.mark.parametrize("case", list(_echoed_everywhere()))
def test_a_key_echoed_by_the_upstream_is_replaced_on_the_way_in(
        client: Client, fake: FakeUpstream, redis_client: redis.Redis, worker: WorkerProcess,
        case: str) -> None:
    step, stream = _echoed_everywhere()[case]
    model = f"keyed-echo-{case}-{uuid.uuid4().hex[:6]}"
    fake.script(model, step)  # type: ignore[arg-type]
    job = client.submit_chat(USER, model=model, stream=stream)
    try:
        shown = repr(job.result(timeout=20))
    except JobFailed as failed:
        shown = repr(failed.error)
    assert fake.requests(model)[0].headers["authorization"] == f"Bearer {SECRET}"
    assert SECRET not in shown and "***" in shown
    assert SECRET not in repr(list(job.events(timeout=5)))
    leaks = [key for key in redis_client.scan_iter(count=1000)
             if SECRET.encode() in _dump(redis_client, key)]
    assert leaks == []
    assert SECRET not in worker.log()


def test_a_key_in_a_retried_error_never_reaches_the_log(
        client: Client, fake: FakeUpstream, worker: WorkerProcess, model: str) -> None:
    model = "keyed-" + model
    fake.script(model, HttpError(503, error={"message": "overloaded", "code": f"c {SECRET}"}),
                Reply(content="fine"))
    assert client.submit_chat(USER, model=model).result(timeout=20) is not None
    assert len(fake.requests(model)) == 2
    wait_until(lambda: "attempt 1 failed (c ***: overloaded)" in worker.log(), 5,
               "the retry's log line")
    assert SECRET not in worker.log()


def test_no_key_in_celery_events_that_flower_shows(worker_env: dict[str, str], workdir: Path,
                                                   fake: FakeUpstream) -> None:
    env = {**worker_env, "API_TASKS_PREFIX": f"ev{uuid.uuid4().hex[:6]}"}
    own = Client(load_settings(env={k: v for k, v in env.items() if k != "FAKE_UPSTREAM_KEY"}))
    events: list[dict[str, Any]] = []
    app = create_app(own.settings)

    def capture(receiver: Any) -> None:
        try:
            receiver.capture(limit=None, timeout=None, wakeup=True)
        except Exception:  # the connection closes under it when the test ends
            if not receiver.should_stop:
                raise

    with app.connection() as conn:
        receiver = app.events.Receiver(conn, handlers={"*": events.append})
        thread = threading.Thread(target=capture, args=(receiver,), daemon=True)
        thread.start()
        worker = WorkerProcess(env, workdir / "events.log", concurrency=2, name="ev",
                               extra=("-E",)).start()
        try:
            fake.script("keyed-events", Reply(pieces=["x"]))
            own.submit_chat(USER, model="keyed-events", stream=True).result(timeout=20)
            wait_until(lambda: any(e.get("type") == "task-succeeded" for e in events), 20,
                       "the task-succeeded event")
        finally:
            receiver.should_stop = True
            worker.stop()
    assert any(e.get("type") == "task-received" for e in events)
    assert SECRET not in repr(events) and "Bearer" not in repr(events)
