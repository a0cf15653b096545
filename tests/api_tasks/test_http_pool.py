"""The worker's upstream connections: one pool for every job thread, each connection
forgotten by its call once it is back in the pool."""

from __future__ import annotations

import json
import threading

import pytest

from api_tasks.upstream.call_handle import CallHandle, Stop
from api_tasks.upstream.http_client import CallRequest, HttpClient
from tests.support.fake_upstream import FakeUpstream, Reply

pytestmark = pytest.mark.integration


def _call(fake: FakeUpstream, model: str) -> CallRequest:
    body = json.dumps({"model": model, "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    return CallRequest(url=fake.base_url + "/v1/chat/completions",
                       headers={"Content-Type": "application/json"}, body=body,
                       connect_timeout=5, read_timeout=30, max_response_bytes=1 << 20)


def _read(http: HttpClient, handle: CallHandle, call: CallRequest) -> bytes:
    response = http.send(handle, call)
    with response:
        return b"".join(http.reads(handle, response, call))


def test_a_finished_calls_abort_does_not_cut_the_next_call_on_its_connection() -> None:
    """Job A's call ends and its connection goes back to the pool; job B, on another
    thread, takes it. A being stopped afterwards (cancelled, its lease lost) must not shut
    B's socket: A's handle forgot it when it went back."""
    with FakeUpstream() as fake:
        fake.script("quick", Reply(pieces=["a", "b"]))
        fake.script("slow", Reply(pieces=["x", "y", "z"], chunk_delay=0.3))
        http = HttpClient(4)
        first = CallHandle("job-a")
        first.start_attempt(30)
        assert b"[DONE]" in _read(http, first, _call(fake, "quick"))
        got: list[bytes | BaseException] = []

        def other_job() -> None:
            handle = CallHandle("job-b")
            handle.start_attempt(30)
            try:
                got.append(_read(http, handle, _call(fake, "slow")))
            except BaseException as err:  # reported below, on the test thread
                got.append(err)

        thread = threading.Thread(target=other_job)
        thread.start()
        fake.wait_for_requests("slow", 1, timeout=10)
        first.abort(Stop.CANCELLED)  # job A, long done, is stopped now
        thread.join(20)
        assert len(got) == 1 and isinstance(got[0], bytes), got
        assert b"[DONE]" in got[0]
        ports = {request.port for request in fake.requests()}
        assert len(ports) == 1  # B did ride A's connection
