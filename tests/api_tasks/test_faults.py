"""Network faults between worker and upstream, injected by a TCP proxy, and huge answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from api_tasks import JobFailed
from api_tasks.client import Client
from tests.support.fake_upstream import BigBody, BigLine, FakeUpstream, Reply
from tests.support.fault_proxy import FaultProxy, Plan
from tests.support.services import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.faults]
USER = [{"role": "user", "content": "Hello"}]
PIECES = [f"w{i} " for i in range(50)]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_reset_mid_stream_fails_without_a_restart(client: Client, fake: FakeUpstream,
                                                  proxy: FaultProxy) -> None:
    model = "proxied-reset-mid"
    fake.script(model, Reply(pieces=PIECES, chunk_delay=0.01))
    proxy.script(model, Plan(reset_after=1500))
    job = client.submit_chat(USER, model=model, stream=True)
    chunks = []
    with pytest.raises(JobFailed) as caught:
        for chunk in job.stream(timeout=20):
            chunks.append(chunk)
    assert chunks  # it had published chunks, so it was not silently restarted
    assert caught.value.error["code"] == "stream_truncated"
    assert "reset" in caught.value.error["message"]
    assert len(fake.requests(model)) == 1


def test_reset_before_any_byte_is_retried(client: Client, fake: FakeUpstream,
                                          proxy: FaultProxy) -> None:
    model = "proxied-reset-early"
    proxy.script(model, Plan(reset_after=0), Plan())
    response = client.submit_chat(USER, model=model, stream=True).result(timeout=20)
    assert response is not None
    assert response["choices"][0]["message"]["content"] == "echo: Hello"
    assert len(fake.requests(model)) == 2


def test_response_dribbled_a_few_bytes_per_read(client: Client, fake: FakeUpstream,
                                                proxy: FaultProxy) -> None:
    model = "proxied-dribble"
    fake.script(model, Reply(pieces=["héllo ", "wörld ", "你好 ", "🎉"], crlf=True))
    proxy.script(model, Plan(piece=3, pause=0.001))
    response = client.submit_chat(USER, model=model, stream=True).result(timeout=30)
    assert response is not None
    assert response["choices"][0]["message"]["content"] == "héllo wörld 你好 🎉"


@pytest.mark.parametrize(("step", "stream", "code"), [
    (BigBody(50 * 1024 * 1024), False, "response_too_large"),
    (BigLine(20 * 1024 * 1024), True, "line_too_long"),
], ids=["50MB-body", "20MB-line"])
def test_huge_answers_are_cut_at_the_cap_with_bounded_memory(
        client: Client, fake: FakeUpstream, worker: WorkerProcess, step: object, stream: bool,
        code: str) -> None:
    model = f"tight-huge-{code}"
    fake.script(model, step)  # type: ignore[arg-type]
    assert worker.proc is not None
    before = _rss_mb(worker.proc.pid)
    with pytest.raises(JobFailed) as caught:
        client.submit_chat(USER, model=model, stream=stream).result(timeout=60)
    assert caught.value.error["code"] == code
    assert _rss_mb(worker.proc.pid) - before < 30  # caps are 1 MiB body, 64 KiB line
