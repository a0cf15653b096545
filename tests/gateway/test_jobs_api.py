"""The jobs API with a plain HTTP client: 202 at once, the job object, events that resume after
Last-Event-ID with no gap and no repeat, a reader after the end, cancel, and tenants apart."""

from __future__ import annotations

import json
import signal
import uuid
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from api_tasks.gateway.app import create_app
from config.loader import load_settings
from tests.conftest import GATEWAY_KEY as KEY
from tests.conftest import GATEWAY_OTHER_KEY as OTHER_KEY
from tests.support.fake_upstream import FakeUpstream, Reply
from tests.support.services import GatewayProcess, wait_until

pytestmark = pytest.mark.integration
USER = [{"role": "user", "content": "Hello"}]
AUTH = {"Authorization": f"Bearer {KEY}"}
FINAL = ("done", "error", "cancelled")


def _events(response: httpx.Response, stop_after: int | None = None) -> list[dict[str, Any]]:
    """The events of an SSE response with their ``id``, up to the final one (or
    ``stop_after`` of them)."""
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    for line in response.iter_lines():
        if line.startswith("id: "):
            current["id"] = line[4:]
        elif line.startswith("data: "):
            current.update(json.loads(line[6:]))
        elif not line and current:
            events.append(current)
            current = {}
            if events[-1]["type"] in FINAL or len(events) == stop_after:
                break
    return events


def test_a_job_is_accepted_then_read_and_its_stream_resumed(gateway: GatewayProcess,
                                                           fake: FakeUpstream,
                                                           model: str) -> None:
    pieces = [f"p{i} " for i in range(30)]
    fake.script(model, Reply(pieces=pieces, chunk_delay=0.01))
    with httpx.Client(base_url=gateway.url, headers=AUTH, timeout=30) as http:
        created = http.post("/v1/jobs", json={
            "url": "/v1/chat/completions", "metadata": {"order": "42"},
            "body": {"model": model, "messages": USER, "stream": True}})
        assert created.status_code == 202
        job = created.json()
        assert job["object"] == "job" and job["status"] in ("queued", "running")
        assert job["metadata"] == {"order": "42"} and job["stream_token"]
        url = f"/v1/jobs/{job['id']}/events"
        with http.stream("GET", url) as first:
            seen = _events(first, stop_after=8)
        with http.stream("GET", url, headers={"Last-Event-ID": seen[-1]["id"]}) as rest:
            seen += _events(rest)
        chunks = [e for e in seen if e["type"] == "chunk"]
        assert [e["seq"] for e in chunks] == list(range(len(chunks)))  # no gap, no repeat
        assert seen[-1]["type"] == "done"
        wait_until(lambda: http.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded",
                   10, "the job to end")
        ended = http.get(f"/v1/jobs/{job['id']}").json()
        text = ended["response"]["choices"][0]["message"]["content"]
        assert text == "".join(pieces)
        # a reader that comes after the end gets everything, from the first event
        with http.stream("GET", url) as late:
            assert _events(late) == seen
        # a browser's EventSource sends no header: the stream token stands in for it
        with httpx.stream("GET", gateway.url + url, params={"token": job["stream_token"]},
                          timeout=30) as by_token:
            assert _events(by_token) == seen
        assert httpx.get(gateway.url + url, params={"token": "1.forged"}).status_code == 404


def test_other_keys_see_nothing_and_cancel_is_idempotent(gateway: GatewayProcess,
                                                         fake: FakeUpstream, model: str) -> None:
    fake.script(model, Reply(delay=5))
    with httpx.Client(base_url=gateway.url, headers=AUTH, timeout=30) as http:
        job = http.post("/v1/jobs", json={"url": "/v1/chat/completions",
                                          "body": {"model": model, "messages": USER}}).json()
        other = {"Authorization": f"Bearer {OTHER_KEY}"}
        for path in (f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}/events"):
            refused = httpx.get(gateway.url + path, headers=other)
            assert refused.status_code == 404
            assert refused.json()["error"]["code"] == "job_not_found"
        assert httpx.post(gateway.url + f"/v1/jobs/{job['id']}/cancel",
                          headers=other).status_code == 404
        first = http.post(f"/v1/jobs/{job['id']}/cancel")
        again = http.post(f"/v1/jobs/{job['id']}/cancel")
        assert first.status_code == again.status_code == 200
        wait_until(lambda: http.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled",
                   15, "the job to be cancelled")
        assert http.get(f"/v1/jobs/{job['id']}").json()["error"]["code"] == "cancelled"
        assert http.get("/v1/jobs/no-such-job").status_code == 404


def test_health_and_readiness_come_from_the_workers_own_records(gateway: GatewayProcess) -> None:
    assert httpx.get(gateway.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(gateway.url + "/readyz")  # the session's worker renews its record
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["status"] == "ready" and body["redis"] == "ok" and len(body["workers"]) >= 1


def test_not_ready_without_a_live_worker_and_a_stopped_worker_leaves_at_once(
        worker_env: dict[str, str], spawn: Any) -> None:
    env = {**worker_env, "API_TASKS_PREFIX": f"gw{uuid.uuid4().hex[:8]}"}
    app = create_app(load_settings(env=env))
    with TestClient(app) as http:
        alone = http.get("/readyz")
        assert alone.status_code == 503 and alone.json()["status"] == "no_workers"
        worker = spawn(env, "ready-w", concurrency=2)
        wait_until(lambda: http.get("/readyz").status_code == 200, 10, "the worker's record")
        worker.signal(signal.SIGTERM)
        worker.wait(30)
        assert http.get("/readyz").json()["workers"] == []  # taken out as it stopped


def test_the_gateway_refuses_what_it_must_with_an_openai_error(gateway: GatewayProcess,
                                                               model: str) -> None:
    with httpx.Client(base_url=gateway.url, headers=AUTH, timeout=30) as http:
        job = http.post("/v1/jobs", json={"url": "/v1/chat/completions", "body": {
            "model": model, "messages": USER}}).json()
        events = f"/v1/jobs/{job['id']}/events"
        for token in ("1.²", "9" * 5000 + ".x", "é" * 43, "1." + "A" * 43):
            refused = httpx.get(gateway.url + events, params={"token": token})
            assert refused.status_code == 404, (token[:10], refused.text)
        for after in ("²-1", "99999999999999999999999-1", "1"):
            bad = http.get(events, params={"after": after})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "after"
        for field in ("upstream", "base_url", "result_ttl"):
            body = {"model": model, "messages": USER, field: "x"}
            refused = http.post("/v1/chat/completions", json=body)
            assert refused.status_code == 400 and refused.json()["error"]["param"] == field
        other = {"Authorization": f"Bearer {OTHER_KEY}"}
        no_model = httpx.post(gateway.url + "/v1/chat/completions", headers=other,
                              json={"messages": USER})  # would run on the default model
        assert no_model.status_code == 403 and no_model.json()["error"]["param"] == "model"
