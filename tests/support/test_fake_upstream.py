"""Tests for the fake OpenAI-format upstream, over real HTTP: replies and stream framing."""

from __future__ import annotations

from typing import Any

import pytest
import requests

from tests.support.fake_client import (
    CHAT,
    COMPLETIONS,
    NON_ASCII,
    chat_body,
    dechunk,
    deltas,
    parse_sse,
    post,
    raw_request,
    sse_json,
)
from tests.support.fake_upstream import (
    FakeUpstream,
    Reply,
)


def test_echo_chat_shape(up: FakeUpstream) -> None:
    r = post(up, chat_body())
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/json"
    body = r.json()
    assert set(body) == {
        "id",
        "object",
        "created",
        "model",
        "choices",
        "usage",
        "system_fingerprint",
    }
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == "m" and isinstance(body["created"], int)
    assert body["choices"] == [
        {
            "index": 0,
            "finish_reason": "stop",
            "logprobs": None,
            "message": {"role": "assistant", "content": "echo: hello big world"},
        }
    ]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def test_echo_chat_list_content_and_default_model(up: FakeUpstream) -> None:
    parts = [
        {"type": "text", "text": "a"},
        {"type": "image_url", "image_url": {}},
        {"type": "text", "text": "b"},
    ]
    body = post(up, {"messages": [{"role": "user", "content": parts}]}).json()
    assert body["model"] == "fake-model"
    assert body["choices"][0]["message"]["content"] == "echo: a b"


def test_echo_completion_shape(up: FakeUpstream) -> None:
    body = post(up, {"model": "c", "prompt": ["first one", "second"]}, COMPLETIONS).json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["choices"] == [
        {"index": 0, "text": "echo: first one", "finish_reason": "stop", "logprobs": None}
    ]
    assert body["usage"]["total_tokens"] == 5


def test_chat_stream_with_usage_and_done(up: FakeUpstream) -> None:
    r = post(up, chat_body(stream=True, stream_options={"include_usage": True}))
    assert r.headers["Content-Type"].startswith("text/event-stream")
    assert r.headers["Transfer-Encoding"] == "chunked"
    events, done = sse_json(r.content)
    assert done
    assert events[0]["object"] == "chat.completion.chunk"
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert deltas(events) == "echo: hello big world"
    assert len(events) == 1 + 4 + 1 + 1  # role, one per word, finish, usage
    assert events[-2]["choices"][0] == {
        "index": 0,
        "delta": {},
        "finish_reason": "stop",
        "logprobs": None,
    }
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 4
    assert len({e["id"] for e in events}) == 1


def test_completion_stream_without_usage(up: FakeUpstream) -> None:
    r = post(up, {"model": "c", "prompt": "a b", "stream": True}, COMPLETIONS)
    events, done = sse_json(r.content)
    assert done and all(e["object"] == "text_completion" for e in events)
    assert deltas(events) == "echo: a b"
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in e for e in events)


QUIRKS = [
    {"crlf": True},
    {"keepalive": True},
    {"multiline_data": True},
    {"event_lines": True},
    {"split_writes": True},
    {"chunked": False},
    {
        "crlf": True,
        "keepalive": True,
        "multiline_data": True,
        "event_lines": True,
        "split_writes": True,
    },
]


@pytest.mark.parametrize("quirks", QUIRKS, ids=lambda q: "+".join(q))
@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_quirky_streams_still_parse(up: FakeUpstream, quirks: dict[str, Any], path: str) -> None:
    up.script("q", Reply(content=NON_ASCII, **quirks))
    body = (
        chat_body("q", stream=True)
        if path == CHAT
        else {"model": "q", "prompt": "x", "stream": True}
    )
    r = post(up, body, path)
    events, done = sse_json(r.content)
    assert done and deltas(events) == NON_ASCII
    if quirks.get("keepalive"):
        assert b": keep-alive" in r.content and r.content.startswith(b":")
    if quirks.get("crlf"):
        assert b"\n" not in r.content.replace(b"\r\n", b"")
    if quirks.get("multiline_data"):
        assert r.content.count(b"data: ") > 2 * len(events)
    if quirks.get("event_lines"):
        assert {name for name, _ in parse_sse(r.content)} == {"message"}
    if quirks.get("chunked") is False:
        assert "Transfer-Encoding" not in r.headers and r.headers["Connection"] == "close"


def test_split_writes_cut_characters_and_crlf(up: FakeUpstream) -> None:
    up.script("q", Reply(content=NON_ASCII, split_writes=True, crlf=True))
    head, raw = raw_request(up, chat_body("q", stream=True))
    chunks, terminated = dechunk(raw)
    assert terminated and b"Transfer-Encoding: chunked" in head

    def decodes(chunk: bytes) -> bool:
        try:
            chunk.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True

    assert not all(decodes(c) for c in chunks)
    assert any(c.endswith(b"\r") for c in chunks)
    events, done = sse_json(b"".join(chunks))
    assert done and deltas(events) == NON_ASCII


def test_pieces_fix_the_deltas_exactly(up: FakeUpstream) -> None:
    up.script("p", Reply(pieces=["He", "llo", " ", "wo", "rld"], finish_reason="length"))
    events, _ = sse_json(post(up, chat_body("p", stream=True)).content)
    assert [e["choices"][0]["delta"].get("content") for e in events[1:-1]] == [
        "He",
        "llo",
        " ",
        "wo",
        "rld",
    ]
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    body = post(up, chat_body("p")).json()
    assert body["choices"][0]["message"]["content"] == "Hello world"


def test_no_done_and_no_finish(up: FakeUpstream) -> None:
    up.script("d", Reply(content="a b", done=False, finish_reason=None))
    events, done = sse_json(post(up, chat_body("d", stream=True)).content)
    assert not done and all(e["choices"][0]["finish_reason"] is None for e in events)


def test_truncate_after_closes_without_done(up: FakeUpstream) -> None:
    up.script("t", Reply(content="one two three four five", truncate_after=2))
    _, raw = raw_request(up, chat_body("t", stream=True, stream_options={"include_usage": True}))
    chunks, terminated = dechunk(raw)
    assert not terminated
    events, done = sse_json(b"".join(chunks))
    assert not done and deltas(events) == "one two "
    assert all(e["choices"] and e["choices"][0]["finish_reason"] is None for e in events)
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        post(up, chat_body("t", stream=True))
