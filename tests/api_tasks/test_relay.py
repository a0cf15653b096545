"""The stream relay in-process, against a real Redis: order, ids, assembly and the cap."""

from __future__ import annotations

import json
import uuid

import pytest
import redis

from api_tasks.errors import StreamError
from api_tasks.record.events import EVENT_FIELD
from api_tasks.record.keys import Keys
from api_tasks.record.writer import EventWriter
from api_tasks.stream.relay import StreamRelay
from tests.conftest import STATE_SHARDS


def _sse(pieces: list[str]) -> bytes:
    chunks = [{"id": "c1", "object": "chat.completion.chunk", "model": "m",
               "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
              for piece in pieces]
    chunks.append({"id": "c1", "object": "chat.completion.chunk", "model": "m",
                   "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    chunks.append({"id": "c1", "object": "chat.completion.chunk", "model": "m", "choices": [],
                   "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}})
    return b"".join(f"data: {json.dumps(c)}\r\n\r\n".encode() for c in chunks) + \
        b"data: [DONE]\r\n\r\n"


def _stored(client: redis.Redis, keys: Keys, job_id: str) -> list[tuple[str, dict[str, object]]]:
    return [(entry_id.decode(), json.loads(fields[EVENT_FIELD.encode()]))
            for entry_id, fields in client.xrange(keys.events(job_id))]


def test_chunks_split_anywhere_land_in_order_with_their_ids(
        redis_client: redis.Redis, writer: EventWriter) -> None:
    keys, job_id = Keys(f"relay{uuid.uuid4().hex[:6]}", shards=STATE_SHARDS), uuid.uuid4().hex
    pieces = ["Hé", "llo", " wörld", "!"]
    body = _sse(pieces)
    relay = StreamRelay(job_id, 2, "chat", keys, writer, 60, 65536)
    done = False
    for start in range(0, len(body), 7):  # cut inside lines, CRLFs and UTF-8 characters
        done = relay.feed(body[start:start + 7]) or done
    assert done and relay.complete()
    writer.write([("PING",)], timeout=10)  # everything handed over is in Redis
    stored = _stored(redis_client, keys, job_id)
    # <attempt>-0 is kept for the reset event that opens a new attempt
    assert [entry_id for entry_id, _ in stored] == [f"2-{n}" for n in range(1, len(pieces) + 3)]
    assert [event["seq"] for _, event in stored] == list(range(len(pieces) + 2))
    assert all(event["type"] == "chunk" and event["attempt"] == 2 for _, event in stored)
    response = relay.response()
    assert response["choices"][0]["message"]["content"] == "".join(pieces)
    assert response["choices"][0]["finish_reason"] == "stop"
    assert response["usage"]["total_tokens"] == 7
    assert 0 < redis_client.ttl(keys.events(job_id)) <= 60


def test_a_stream_past_its_cap_stops_with_everything_before_it_kept(
        redis_client: redis.Redis, writer: EventWriter) -> None:
    keys, job_id = Keys(f"relay{uuid.uuid4().hex[:6]}", shards=STATE_SHARDS), uuid.uuid4().hex
    relay = StreamRelay(job_id, 1, "chat", keys, writer, 60, 65536, max_events=10)
    with pytest.raises(StreamError) as caught:
        relay.feed(_sse(["x"] * 50))
    assert caught.value.code == "stream_too_large" and not caught.value.retryable
    writer.write([("PING",)], timeout=10)
    assert relay.published == 10
    assert len(_stored(redis_client, keys, job_id)) == 10  # every chunk counted is in Redis


def _typed(events: list[dict[str, object]], done: bool = False) -> bytes:
    body = b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)
    return body + (b"data: [DONE]\n\n" if done else b"")


def test_a_responses_stream_ends_well_only_with_its_closing_event(
        redis_client: redis.Redis, writer: EventWriter) -> None:
    keys = Keys(f"relay{uuid.uuid4().hex[:6]}", shards=STATE_SHARDS)
    opened = [{"type": "response.created", "sequence_number": 0, "response": {"id": "r"}},
              {"type": "response.output_text.delta", "sequence_number": 1, "delta": "Hi"}]
    closing = {"type": "response.completed", "sequence_number": 2,
               "response": {"id": "r", "status": "completed", "output": []}}
    whole = StreamRelay(uuid.uuid4().hex, 1, "response", keys, writer, 60, 65536)
    assert whole.feed(_typed([*opened, closing])) and whole.complete()
    assert whole.response() == closing["response"] and whole.published == 3
    cut = StreamRelay(uuid.uuid4().hex, 1, "response", keys, writer, 60, 65536)
    assert cut.feed(_typed(opened, done=True))  # [DONE] with no response: truncated
    assert not cut.complete()
    failed_id = uuid.uuid4().hex
    failed = StreamRelay(failed_id, 1, "response", keys, writer, 60, 65536)
    refusal = {"type": "response.failed", "sequence_number": 2, "response": {
        "id": "r", "status": "failed", "error": {"code": "server_error", "message": "broke"}}}
    with pytest.raises(StreamError) as raised:
        failed.feed(_typed([*opened, refusal]))
    assert (raised.value.code, raised.value.message) == ("server_error", "broke")
    writer.write([("PING",)], timeout=10)
    # the failure is published first, so readers see it, partial output and all
    assert [event["data"]["type"] for _, event in _stored(redis_client, keys, failed_id)] == [
        "response.created", "response.output_text.delta", "response.failed"]
