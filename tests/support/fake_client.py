"""Helpers for testing the fake upstream over raw HTTP and sockets."""

from __future__ import annotations

import json
import re
import socket
from typing import Any

import requests

from tests.support.fake_upstream import (
    FakeUpstream,
)

NON_ASCII = "héllo wörld 你好 🎉"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"



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


