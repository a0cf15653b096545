"""Streamed jobs: every chunk in order to the Redis Stream and pub/sub, then one final event."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
import redis

from api_tasks import JobFailed
from api_tasks.client import Client
from tests.support.fake_upstream import FakeUpstream, InvalidUtf8, Reply, StreamError

pytestmark = pytest.mark.integration
USER = [{"role": "user", "content": "Hello"}]
PIECES = ["Hé", "llo", " wör", "ld ", "你好", " 🎉", "!"]


def _content(chunks: list[dict[str, Any]]) -> str:
    return "".join((c["choices"][0].get("delta") or {}).get("content") or ""
                   for c in chunks if c.get("choices"))


@pytest.mark.parametrize("quirks", [
    {},
    {"keepalive": True},
    {"event_lines": True},
    {"crlf": True},
    {"multiline_data": True},
    {"split_writes": True},
    {"split_writes": True, "crlf": True, "keepalive": True},
    {"chunked": False},
    {"done": False},
], ids=lambda q: ",".join(q) or "plain")
def test_stream_quirks_give_every_chunk_in_order(client: Client, fake: FakeUpstream, model: str,
                                                 quirks: dict[str, Any]) -> None:
    fake.script(model, Reply(pieces=PIECES, **quirks))
    job = client.submit_chat(USER, model=model, stream=True)
    chunks = list(job.stream(timeout=20))
    assert _content(chunks) == "".join(PIECES)
    assert chunks[-1]["usage"]["total_tokens"] > 0
    response = job.result(timeout=5)
    assert response is not None
    assert response["object"] == "chat.completion"
    assert response["choices"][0]["message"] == {"role": "assistant", "content": "".join(PIECES)}
    assert response["choices"][0]["finish_reason"] == "stop"
    assert response["usage"] == chunks[-1]["usage"]


def test_events_are_numbered_from_zero_and_end_with_done(client: Client, fake: FakeUpstream,
                                                         model: str) -> None:
    fake.script(model, Reply(pieces=PIECES))
    job = client.submit_chat(USER, model=model, stream=True)
    events = list(job.events(timeout=20))
    chunks = [e for e in events if e["type"] == "chunk"]
    assert [e["seq"] for e in chunks] == list(range(len(chunks)))
    final = events[-1]
    assert final["type"] == "done" and final["seq"] == len(chunks)
    assert final["finish_reason"] == "stop" and final["usage"]["total_tokens"] > 0
    assert sum(e["type"] != "chunk" for e in events) == 1


def test_usage_is_requested_for_streams(client: Client, fake: FakeUpstream, model: str) -> None:
    client.submit_chat(USER, model=model, stream=True).result(timeout=20)
    assert fake.requests(model)[0].body["stream_options"] == {"include_usage": True}  # type: ignore[index]


def test_late_reader_after_the_end_replays_everything(client: Client, fake: FakeUpstream,
                                                     model: str) -> None:
    fake.script(model, Reply(pieces=PIECES))
    job = client.submit_chat(USER, model=model, stream=True)
    job.result(timeout=20)
    first = list(job.stream(timeout=5))
    second = list(client.job(job.id).stream(timeout=5))
    assert first == second and _content(first) == "".join(PIECES)


def test_reader_attached_mid_stream_misses_nothing(client: Client, fake: FakeUpstream,
                                                   model: str) -> None:
    pieces = [f"p{i} " for i in range(30)]
    fake.script(model, Reply(pieces=pieces, chunk_delay=0.02))
    job = client.submit_chat(USER, model=model, stream=True)
    events = job.events(timeout=20)
    next(events)  # the stream has started
    rest = list(client.job(job.id).stream(timeout=20))
    assert _content(rest) == "".join(pieces)


def test_pubsub_fans_out_the_same_events_live(client: Client, fake: FakeUpstream,
                                              redis_client: redis.Redis, model: str) -> None:
    fake.script(model, Reply(pieces=PIECES, first_chunk_delay=0.5))
    pubsub = redis_client.pubsub()
    job_holder: dict[str, Any] = {}
    got: list[dict[str, Any]] = []

    def listen() -> None:
        for message in pubsub.listen():
            if message["type"] != "message":
                continue
            got.append(json.loads(message["data"]))
            if got[-1]["type"] != "chunk":
                return

    job = client.submit_chat(USER, model=model, stream=True)
    job_holder["id"] = job.id
    pubsub.subscribe(client.keys.channel(job.id))
    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    stored = list(job.events(timeout=20))
    thread.join(10)
    pubsub.close()
    assert [e["seq"] for e in got] == [e["seq"] for e in stored]
    assert got[-1]["type"] == "done"


def test_calls_one_after_another_share_one_connection(client: Client, fake: FakeUpstream,
                                                      model: str) -> None:
    # a stream read to its [DONE] still holds the chunked coding's end: unread, its connection
    # would be closed, and every call would pay a new one (with TLS, a handshake)
    fake.script(model, Reply(pieces=PIECES))
    for n in range(12):
        job = client.submit_chat(USER, model=model, stream=n % 3 != 2)
        assert job.result(timeout=20) is not None
    ports = {request.port for request in fake.requests(model)}
    assert len(fake.requests(model)) == 12
    assert len(ports) <= 2, f"{len(ports)} connections for 12 calls one after another"


def test_a_stream_slow_to_end_after_done_costs_its_connection_not_its_job(
        client: Client, fake: FakeUpstream, model: str) -> None:
    fake.script(model, Reply(pieces=PIECES, end_delay=30.0))  # [DONE], then nothing for 30 s
    started = time.monotonic()
    job = client.submit_chat(USER, model=model, stream=True)
    assert _content(list(job.stream(timeout=20))) == "".join(PIECES)
    assert time.monotonic() - started < 10  # the job ended without waiting out the server
    fake.script(model, Reply(pieces=PIECES))
    second = client.submit_chat(USER, model=model, stream=True)  # on a new connection
    assert _content(list(second.stream(timeout=20))) == "".join(PIECES)
    first, last = fake.requests(model)
    assert first.port != last.port


def test_truncated_stream_fails(client: Client, fake: FakeUpstream, model: str) -> None:
    fake.script(model, Reply(pieces=PIECES, truncate_after=3))
    job = client.submit_chat(USER, model=model, stream=True)
    with pytest.raises(JobFailed) as caught:
        list(job.stream(timeout=20))
    assert caught.value.error["code"] == "stream_truncated"
    with pytest.raises(JobFailed):
        job.result(timeout=5)
    assert len(fake.requests(model)) == 1  # chunks were published: never silently restarted


def test_stream_without_done_but_finished_succeeds(client: Client, fake: FakeUpstream,
                                                   model: str) -> None:
    fake.script(model, Reply(pieces=PIECES, done=False, usage=False))
    job = client.submit_chat(USER, model=model, stream=True)
    response = job.result(timeout=20)
    assert response is not None and response["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("event_line", [False, True])
def test_error_inside_a_200_stream(client: Client, fake: FakeUpstream, model: str,
                                   event_line: bool) -> None:
    fake.script(model, StreamError(after=2, event_line=event_line,
                                   error={"message": "model overloaded", "type": "server_error",
                                          "code": "overloaded"}))
    job = client.submit_chat(USER, model=model, stream=True)
    chunks: list[dict[str, Any]] = []
    with pytest.raises(JobFailed) as caught:
        for chunk in job.stream(timeout=20):
            chunks.append(chunk)
    # chunks read together with the error event are published before it
    assert len(chunks) == 3 and _content(chunks) != ""
    error = caught.value.error
    assert error["code"] == "overloaded" and error["message"] == "model overloaded"
    assert error["type"] == "server_error" and error["status"] == 200
    assert len(fake.requests(model)) == 1


@pytest.mark.faults
def test_invalid_utf8_is_replaced_not_fatal(client: Client, fake: FakeUpstream, model: str) -> None:
    fake.script(model, InvalidUtf8())
    response = client.submit_chat(USER, model=model, stream=True).result(timeout=20)
    assert response is not None
    assert "\ufffd" in response["choices"][0]["message"]["content"]


def test_streamed_completion_and_tool_calls(client: Client, fake: FakeUpstream, model: str) -> None:
    response = client.submit_completion("Say it", model=model, stream=True).result(timeout=20)
    assert response is not None
    assert response["object"] == "text_completion"
    assert response["choices"][0]["text"] == "echo: Say it"
    tools_model = model + "-tools"
    fake.script(tools_model, Reply(tool_calls=True))
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    streamed = client.submit_chat(USER, model=tools_model, stream=True, tools=tools).result(20)
    plain = client.submit_chat(USER, model=tools_model, tools=tools).result(20)
    assert streamed is not None and plain is not None
    assert streamed["choices"][0]["finish_reason"] == "tool_calls"
    call = streamed["choices"][0]["message"]["tool_calls"][0]
    assert call["function"] == plain["choices"][0]["message"]["tool_calls"][0]["function"]
    assert json.loads(call["function"]["arguments"])


def test_several_choices_are_assembled_apart(client: Client, fake: FakeUpstream,
                                             model: str) -> None:
    fake.script(model, Reply(pieces=["a", "b", "c"], n=2))
    response = client.submit_chat(USER, model=model, stream=True, n=2).result(timeout=20)
    assert response is not None
    assert [c["index"] for c in response["choices"]] == [0, 1]
    assert all(c["message"]["content"] == "abc" for c in response["choices"])
