"""Stream readers that come late, drop and resume, or read slowly: no gap, no repeat, one end."""

from __future__ import annotations

import time
from typing import Any

import pytest

from api_tasks.client import Client
from tests.support.fake_upstream import FakeUpstream, Reply

pytestmark = [pytest.mark.integration, pytest.mark.faults]
USER = [{"role": "user", "content": "Hello"}]
PIECES = [f"p{i} " for i in range(40)]


def _check_complete(events: list[dict[str, Any]]) -> None:
    chunks = [e for e in events if e["type"] == "chunk"]
    # the role chunk, the pieces, the finish chunk and the usage chunk
    assert [e["seq"] for e in chunks] == list(range(len(PIECES) + 3))
    assert [e["type"] for e in events if e["type"] != "chunk"] == ["done"]
    text = "".join((c["data"]["choices"] or [{}])[0].get("delta", {}).get("content") or ""
                   for c in chunks if c["data"].get("choices"))
    assert text == "".join(PIECES)


def test_reader_that_drops_and_resumes_from_its_last_id(client: Client, fake: FakeUpstream,
                                                        model: str) -> None:
    fake.script(model, Reply(pieces=PIECES, chunk_delay=0.01))
    job = client.submit_chat(USER, model=model, stream=True)
    seen: list[dict[str, Any]] = []
    first = job.events(timeout=20)
    for event in first:
        seen.append(event)
        if len(seen) == 7:
            break
    first.close()  # the connection drops
    seen += list(client.job(job.id).events(timeout=20, after=seen[-1]["id"]))
    _check_complete(seen)


def test_slow_reader_gets_everything(client: Client, fake: FakeUpstream, model: str) -> None:
    fake.script(model, Reply(pieces=PIECES))  # the upstream is far faster than the reader
    job = client.submit_chat(USER, model=model, stream=True)
    seen = []
    for event in job.events(timeout=30):
        seen.append(event)
        time.sleep(0.01)  # a slow consumer, on purpose
    _check_complete(seen)


def test_late_reader_and_live_reader_agree(client: Client, fake: FakeUpstream,
                                          model: str) -> None:
    fake.script(model, Reply(pieces=PIECES, chunk_delay=0.005))
    job = client.submit_chat(USER, model=model, stream=True)
    live = list(job.events(timeout=20))
    late = list(client.job(job.id).events(timeout=5))
    _check_complete(live)
    assert late == live
