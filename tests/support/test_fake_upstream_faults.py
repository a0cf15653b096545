"""Tests for the fake OpenAI-format upstream, over real HTTP: errors, faults and bookkeeping."""

from __future__ import annotations

import json
import socket
import time

import pytest
import requests

from tests.support.fake_client import (
    CHAT,
    COMPLETIONS,
    chat_body,
    parse_sse,
    post,
    sse_json,
)
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
