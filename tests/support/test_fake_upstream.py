"""Tests for the fake OpenAI-format upstream, over real HTTP."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.support.fake_upstream import (
    BigBody,
    BigLine,
    Close,
    Drip,
    FakeUpstream,
    Hang,
    Html,
    HttpError,
    InvalidUtf8,
    Reply,
    Slow,
    StreamError,
)

NON_ASCII = "héllo wörld 你好 🎉"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


@pytest.fixture
def up() -> Iterator[FakeUpstream]:
    """A started server, stopped after the test."""
    with FakeUpstream() as server:
        yield server


def chat_body(model: str = "m", text: str = "hello big world", **extra: Any) -> dict[str, Any]:
    """A minimal chat request body."""
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def post(up: FakeUpstream, body: dict[str, Any], path: str = CHAT, **kw: Any) -> requests.Response:
    """POSTs JSON with a short timeout so a broken server fails fast."""
    kw.setdefault("timeout", 5)
    return requests.post(up.base_url + path, json=body, **kw)


def parse_sse(data: bytes) -> list[tuple[str, str]]:
    """Reference SSE parser (WHATWG rules): (event name, data) per dispatched event."""
    events: list[tuple[str, str]] = []
    buf: list[str]
    name, buf = "", []
    for line in re.split(r"\r\n|\r|\n", data.decode("utf-8")):
        if not line:
            if buf:
                events.append((name or "message", "\n".join(buf)))
            name, buf = "", []
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "data":
            buf.append(value)
        elif field == "event":
            name = value
    return events


def sse_json(data: bytes) -> tuple[list[dict[str, Any]], bool]:
    """The JSON events of a stream and whether it ended with [DONE]."""
    datas = [d for _, d in parse_sse(data)]
    done = bool(datas) and datas[-1] == "[DONE]"
    return [json.loads(d) for d in datas if d != "[DONE]"], done


def deltas(events: list[dict[str, Any]]) -> str:
    """Concatenated content of chat or completion chunks."""
    out = []
    for e in events:
        for c in e["choices"]:
            out.append(c["delta"].get("content") or "" if "delta" in c else c["text"])
    return "".join(out)


def raw_request(up: FakeUpstream, body: dict[str, Any], path: str = CHAT) -> tuple[bytes, bytes]:
    """Sends one Connection: close request on a raw socket; returns (head, raw body)."""
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: fake\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", up.port), timeout=5) as sock:
        sock.sendall(head + payload)
        data = b"".join(iter(lambda: sock.recv(65536), b""))
    resp_head, _, rest = data.partition(b"\r\n\r\n")
    return resp_head, rest


def dechunk(data: bytes) -> tuple[list[bytes], bool]:
    """Splits a chunked body into its chunks; True when the 0-chunk terminated it."""
    chunks: list[bytes] = []
    while data:
        line, _, data = data.partition(b"\r\n")
        size = int(line, 16)
        if size == 0:
            return chunks, True
        chunks.append(data[:size])
        data = data[size + 2 :]
    return chunks, False


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


def test_http_error_with_headers(up: FakeUpstream) -> None:
    up.script(
        "e",
        HttpError(429, headers={"Retry-After": "2", "retry-after-ms": "1500"}),
        HttpError(500, body=b"oops", content_type="text/plain"),
    )
    r = post(up, chat_body("e"))
    assert r.status_code == 429
    assert r.headers["Retry-After"] == "2" and r.headers["retry-after-ms"] == "1500"
    assert r.json()["error"] == {
        "message": "Rate limit reached for requests.",
        "type": "requests",
        "param": None,
        "code": "rate_limit_exceeded",
    }
    r = post(up, chat_body("e"))
    assert (r.status_code, r.text, r.headers["Content-Type"]) == (500, "oops", "text/plain")


def test_http_error_custom_error_object(up: FakeUpstream) -> None:
    up.script(
        "e",
        HttpError(
            400,
            error={
                "message": "too long",
                "type": "invalid_request_error",
                "code": "context_length_exceeded",
            },
        ),
    )
    assert post(up, chat_body("e")).json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize("status", [502, 200])
def test_html_page(up: FakeUpstream, status: int) -> None:
    up.script("h", Html(status=status))
    r = post(up, chat_body("h"))
    assert r.status_code == status and r.headers["Content-Type"] == "text/html"
    assert "<title>502 Bad Gateway</title>" in r.text and "nginx" in r.text


def test_hang_counts_client_disconnect(up: FakeUpstream, capfd: pytest.CaptureFixture[str]) -> None:
    up.script("h", Hang(max_seconds=10))
    sock = socket.create_connection(("127.0.0.1", up.port), timeout=5)
    payload = json.dumps(chat_body("h")).encode()
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: f\r\nContent-Length: %d\r\n\r\n%b"
        % (len(payload), payload)
    )
    up.wait_for_requests("h", 1, timeout=5)
    assert up.disconnects("h") == 0
    sock.close()
    up.wait_for_disconnect("h", timeout=5)
    assert up.disconnects("h") == 1
    assert capfd.readouterr().err == ""


def test_cancelled_stream_counts_disconnect(up: FakeUpstream) -> None:
    up.script("s", Reply(pieces=[f"p{i} " for i in range(100)], chunk_delay=0.05))
    r = post(up, chat_body("s", stream=True), stream=True)
    lines = r.iter_lines()
    assert next(lines).startswith(b"data: ")
    r.close()
    started = time.monotonic()
    up.wait_for_disconnect("s", timeout=5)
    assert time.monotonic() - started < 2


def test_slow_non_stream_counts_client_timeout(up: FakeUpstream) -> None:
    up.script("slow", Slow(5))
    with pytest.raises(requests.exceptions.ReadTimeout):
        post(up, chat_body("slow"), timeout=0.2)
    up.wait_for_disconnect("slow", timeout=5)


def test_script_order_and_last_step_repeats(up: FakeUpstream) -> None:
    up.script("m", HttpError(503), Reply(content="a"), Reply(content="b"))
    results = []
    for _ in range(4):
        r = post(up, chat_body("m"))
        results.append(r.json()["choices"][0]["message"]["content"] if r.ok else r.status_code)
    assert results == [503, "a", "b", "b"]
    other = post(up, chat_body("other")).json()
    assert other["choices"][0]["message"]["content"] == "echo: hello big world"


def test_recordings_and_reset(up: FakeUpstream) -> None:
    post(up, chat_body("a", text="first"), headers={"Authorization": "Bearer k"})
    post(up, {"model": "b", "prompt": "p"}, COMPLETIONS + "?x=1")
    post(up, chat_body("a", text="second"))
    recs = up.requests("a")
    assert [r.body["messages"][0]["content"] for r in recs if r.body] == ["first", "second"]
    assert recs[0].headers["authorization"] == "Bearer k" and recs[0].path == CHAT
    assert json.loads(recs[0].raw) == recs[0].body and recs[0].at <= recs[1].at
    assert [r.path for r in up.requests()] == [CHAT, COMPLETIONS, CHAT]
    assert len(up.wait_for_requests("a", 2, timeout=1)) == 2
    with pytest.raises(AssertionError):
        up.wait_for_requests("a", 3, timeout=0.05)
    up.reset()
    assert up.requests() == []


def test_routing_and_validation_errors(up: FakeUpstream) -> None:
    r = post(up, chat_body(), "/chat/completions")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"
    assert r.json()["error"]["type"] == "invalid_request_error"
    r = requests.post(up.base_url + CHAT, data=b"{not json", timeout=5)
    assert r.status_code == 400 and "error" in r.json()
    assert post(up, {"model": "m"}).json()["error"]["param"] == "messages"
    assert post(up, {"model": "m"}, COMPLETIONS).json()["error"]["param"] == "prompt"
    up.script("scripted", Reply())
    models = requests.get(up.base_url + "/v1/models", timeout=5).json()
    assert [m["id"] for m in models["data"]] == ["fake-model", "scripted"]


def test_keep_alive_serves_several_requests_per_connection(up: FakeUpstream) -> None:
    payload = json.dumps(chat_body(stream=True)).encode()
    req = b"POST %b HTTP/1.1\r\nHost: f\r\nContent-Length: %d\r\n\r\n%b" % (
        CHAT.encode(),
        len(payload),
        payload,
    )
    with socket.create_connection(("127.0.0.1", up.port), timeout=5) as sock:
        for _ in range(2):
            sock.sendall(req)
            data = b""
            while not data.endswith(b"\r\n0\r\n\r\n"):
                data += sock.recv(65536)
            assert data.startswith(b"HTTP/1.1 200")


def test_close_step_drops_connection(up: FakeUpstream) -> None:
    up.script("c", Close())
    with pytest.raises(requests.exceptions.ConnectionError):
        post(up, chat_body("c"))


@pytest.mark.parametrize("event_line", [False, True])
def test_stream_error_event(up: FakeUpstream, event_line: bool) -> None:
    up.script("se", StreamError(after=2, event_line=event_line))
    events = parse_sse(post(up, chat_body("se", stream=True)).content)
    assert len(events) == 1 + 2 + 1 and events[-1][1] != "[DONE]"
    assert events[-1][0] == ("error" if event_line else "message")
    assert json.loads(events[-1][1])["error"]["code"] == "overloaded"


def test_tool_calls(up: FakeUpstream) -> None:
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    up.script("tc", Reply(content="x", tool_calls=True))
    msg = post(up, chat_body("tc", tools=tools)).json()["choices"][0]
    assert msg["finish_reason"] == "tool_calls"
    assert msg["message"]["tool_calls"][0]["function"]["name"] == "lookup"
    events, done = sse_json(post(up, chat_body("tc", stream=True, tools=tools)).content)
    calls = [
        e["choices"][0]["delta"]["tool_calls"][0]
        for e in events
        if "tool_calls" in e["choices"][0]["delta"]
    ]
    assert calls[0]["id"].startswith("call_") and calls[0]["function"]["name"] == "lookup"
    assert len(calls) > 2
    assert json.loads("".join(c["function"]["arguments"] for c in calls)) == {"query": "x"}
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls" and done


def test_n_choices_interleave(up: FakeUpstream) -> None:
    up.script("n", Reply(content="a b", n=2))
    events, _ = sse_json(post(up, chat_body("n", stream=True)).content)
    assert [e["choices"][0]["index"] for e in events] == [0, 1] * 4
    body = post(up, chat_body("n")).json()
    assert [c["index"] for c in body["choices"]] == [0, 1]


def test_drip_counts_disconnect(up: FakeUpstream) -> None:
    up.script("drip", Drip(interval=0.02, total=5))
    r = post(up, chat_body("drip", stream=True), stream=True)
    assert r.status_code == 200
    assert r.raw.read(3) == b":  "
    r.close()
    up.wait_for_disconnect("drip", timeout=5)


def test_drip_head_too(up: FakeUpstream) -> None:
    up.script("drip", Drip(interval=0.001, total=0.4, status_first=False))
    r = post(up, chat_body("drip"))
    assert r.status_code == 200 and r.content.startswith(b": ") and r.content.endswith(b"\n\n")


def test_big_body_and_big_line(up: FakeUpstream) -> None:
    up.script("big", BigBody(300_000))
    r = post(up, chat_body("big"))
    assert len(r.content) == 300_000 and r.json()["object"] == "chat.completion"
    up.script("line", BigLine(200_000))
    r = post(up, chat_body("line", stream=True))
    assert len(r.content) == 200_000 and r.content.startswith(b"data: {")
    assert b"\n" not in r.content


def test_invalid_utf8(up: FakeUpstream) -> None:
    up.script("bad", InvalidUtf8())
    r = post(up, chat_body("bad", stream=True))
    assert b"\xff\xfe" in r.content and r.content.endswith(b"data: [DONE]\n\n")
    assert b"\xff\xfe" in post(up, chat_body("bad")).content


def test_record_false_skips_recording() -> None:
    with FakeUpstream(record=False) as server:
        assert post(server, chat_body()).status_code == 200
        assert server.requests() == []
        with pytest.raises(RuntimeError):
            server.wait_for_requests("m", 1)
