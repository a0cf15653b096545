"""API keys stay in the worker: never in the broker, results, streams, errors or logs."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from api_tasks import JobFailed
from api_tasks.client import Client
from tests.conftest import SECRET
from tests.support.fake_upstream import FakeUpstream, HttpError, Reply
from tests.support.services import WorkerProcess

pytestmark = pytest.mark.integration
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
