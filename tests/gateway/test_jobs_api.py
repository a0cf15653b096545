"""The jobs API with a plain HTTP client: 202 at once, the job object, events that resume after
Last-Event-ID with no gap and no repeat, a reader after the end, cancel, and tenants apart."""

from __future__ import annotations

import contextlib
import itertools
import json
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from starlette.testclient import TestClient

from api_tasks.gateway.app import create_app
from api_tasks.gateway.auth import StreamTokens
from api_tasks.record.events import EVENT_FIELD, chunk_event, entry_id, final_event, reset_event
from api_tasks.record.job_record import TERMINAL, JobStatus
from api_tasks.record.keys import Keys
from config.loader import load_settings
from tests.conftest import GATEWAY_KEY as KEY
from tests.conftest import GATEWAY_LIMITED_KEY as LIMITED_KEY
from tests.conftest import GATEWAY_OTHER_KEY as OTHER_KEY
from tests.conftest import GATEWAY_TOKENED_KEY as TOKENED_KEY
from tests.conftest import LIMITED_RPM, TOKENED_TPM, start_gateway
from tests.support.fake_upstream import FakeUpstream, Reply
from tests.support.job_events import read_events
from tests.support.records import jobs_of_model
from tests.support.services import ROOT, GatewayProcess, RedisServer, wait_until

pytestmark = pytest.mark.integration
USER = [{"role": "user", "content": "Hello"}]
AUTH = {"Authorization": f"Bearer {KEY}"}


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
        assert set(job) == {"id", "object", "status", "url", "created_at", "started_at",
                            "finished_at", "attempts", "response", "error", "metadata",
                            "stream_token"}
        assert job["object"] == "job" and job["status"] in ("queued", "running")
        assert job["url"] == "/v1/chat/completions" and job["created_at"] > 0
        assert job["metadata"] == {"order": "42"} and job["stream_token"]
        url = f"/v1/jobs/{job['id']}/events"
        with http.stream("GET", url) as first:
            seen = read_events(first, stop_after=8)
        with http.stream("GET", url, headers={"Last-Event-ID": seen[-1]["id"]}) as rest:
            seen += read_events(rest)
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
            assert read_events(late) == seen
        # a browser's EventSource sends no header: the stream token stands in for it
        with httpx.stream("GET", gateway.url + url, params={"token": job["stream_token"]},
                          timeout=30) as by_token:
            assert read_events(by_token) == seen
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
        for answer in (first, again):  # the job object, as GET shows it
            assert answer.json()["id"] == job["id"] and answer.json()["object"] == "job"
        assert again.json()["status"] in ("running", "cancelled")
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
        missing = httpx.post(gateway.url + "/v1/jobs", json={
            "url": "/v1/chat/completions", "body": {"model": model, "messages": USER}})
        assert missing.status_code == 401
        assert missing.json()["error"]["code"] == "missing_api_key"
        other = {"Authorization": f"Bearer {OTHER_KEY}"}
        lane = httpx.post(gateway.url + "/v1/jobs", headers=other, json={
            "url": "/v1/chat/completions", "queue": "interactive",
            "body": {"model": "allowed-" + model, "messages": USER}})
        assert lane.status_code == 403 and lane.json()["error"]["param"] == "queue"
        no_model = httpx.post(gateway.url + "/v1/chat/completions", headers=other,
                              json={"messages": USER})  # would run on the default model
        assert no_model.status_code == 403 and no_model.json()["error"]["param"] == "model"


def test_a_key_lists_its_own_jobs_newest_first_page_by_page(gateway: GatewayProcess,
                                                            redis_client: Any,
                                                            settings: Any, model: str) -> None:
    with httpx.Client(base_url=gateway.url, headers=AUTH, timeout=30) as http:
        ours = [http.post("/v1/jobs", json={"url": "/v1/completions", "body": {
            "model": model, "prompt": f"p{i}"}}).json()["id"] for i in range(5)]
        theirs = httpx.post(gateway.url + "/v1/jobs", headers={
            "Authorization": f"Bearer {OTHER_KEY}"}, json={
            "url": "/v1/completions", "queue": "bulk",
            "body": {"model": "allowed-x", "prompt": "x"}}).json()["id"]
        # a job whose record expired leaves the listing (and the index) when it is met
        redis_client.delete(Keys.of(settings).job(ours[2]))
        listed: list[str] = []
        page = http.get("/v1/jobs", params={"limit": 2}).json()
        assert page["object"] == "list" and len(page["data"]) == 2 and page["has_more"]
        assert page["first_id"] == page["data"][0]["id"] == ours[-1]
        while True:
            listed += [job["id"] for job in page["data"]]
            # a listing leaves responses out (they can be large): GET /v1/jobs/{id} has them
            assert all(job["object"] == "job" and job["response"] is None
                       for job in page["data"])
            if not page["has_more"]:
                break
            page = http.get("/v1/jobs", params={"limit": 2, "after": page["last_id"]}).json()
        assert [i for i in listed if i in ours] == [ours[4], ours[3], ours[1], ours[0]]
        assert theirs not in listed and len(listed) == len(set(listed))
        index = f"{settings.redis.prefix}:owner:main:jobs"
        assert redis_client.zscore(index, ours[2]) is None and redis_client.ttl(index) > 0
        for params, param in (({"limit": 0}, "limit"), ({"limit": "x"}, "limit"),
                              ({"limit": "²"}, "limit"), ({"limit": 101}, "limit"),
                              ({"after": theirs}, "after")):
            refused = http.get("/v1/jobs", params=params)
            assert refused.status_code == 400 and refused.json()["error"]["param"] == param


def test_a_key_with_its_own_limit_is_paced_cluster_wide(gateway: GatewayProcess,
                                                        fake: FakeUpstream, model: str) -> None:
    limited = {"Authorization": f"Bearer {LIMITED_KEY}"}
    n = 4
    with httpx.Client(base_url=gateway.url, headers=limited, timeout=30) as http:
        ids = [http.post("/v1/jobs", json={"url": "/v1/completions", "body": {
            "model": model, "prompt": f"p{i}"}}).json()["id"] for i in range(n)]
        wait_until(lambda: all(http.get(f"/v1/jobs/{i}").json()["status"] == "succeeded"
                               for i in ids), 30, "the limited key's jobs to end")
    arrivals = [r.at for r in fake.requests(model)]
    assert len(arrivals) == n
    # the key's 120 requests a minute space its calls half a second apart (the upstream has
    # no limit); the pacing allows 0.2 s of burst once
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert arrivals[-1] - arrivals[0] >= (n - 1) * 60 / LIMITED_RPM - 0.3, gaps


def test_a_keys_tokens_per_minute_count_as_the_upstream_counts_them(
        gateway: GatewayProcess, fake: FakeUpstream, model: str) -> None:
    tokened = {"Authorization": f"Bearer {TOKENED_KEY}"}
    n = 4
    with httpx.Client(base_url=gateway.url, headers=tokened, timeout=30) as http:
        ids = [http.post("/v1/jobs", json={"url": "/v1/chat/completions", "body": {
            "model": model, "messages": USER, "max_tokens": 1000}}).json()["id"]
            for _ in range(n)]
        wait_until(lambda: all(http.get(f"/v1/jobs/{i}").json()["status"] == "succeeded"
                               for i in ids), 30, "the key's jobs to end")
    arrivals = sorted(r.at for r in fake.requests(model))
    assert len(arrivals) == n
    # each call counts its prompt and its 1,000-token ceiling when it arrives (as OpenAI
    # counts): about a second of the key's 1,000 tokens a second (the upstream has no limit)
    per_call = 1000 / (TOKENED_TPM / 60)
    assert arrivals[-1] - arrivals[0] >= (n - 1) * per_call - 0.3, arrivals


def test_a_gateway_refuses_to_start_when_a_keys_variable_is_unset(
        worker_env: dict[str, str], workdir: Any) -> None:
    env = {k: v for k, v in worker_env.items() if not k.startswith("GW_")}
    done = subprocess.run([sys.executable, "-m", "api_tasks", "gateway", "--port", "0"],
                          env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2, done.stderr
    assert "gateway.keys[0].key_env: the environment variable GW_MAIN_KEY is not set" \
        in done.stderr
    assert "Traceback" not in done.stderr


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _unread(gateway: GatewayProcess, request: bytes) -> socket.socket:
    """A connection that sends ``request`` and then reads nothing, into a small buffer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", gateway.port))
    sock.sendall(request)
    return sock


def _rest(sock: socket.socket) -> bytes:
    """Everything the connection brings until the server closes it."""
    data = bytearray()
    sock.settimeout(30)
    while piece := sock.recv(1 << 20):
        data += piece
    sock.close()
    return bytes(data)


def test_a_reader_that_does_not_read_never_makes_the_gateway_buffer_its_stream(
        gateway: GatewayProcess, fake: FakeUpstream, client: Any, model: str) -> None:
    # a 26 MB stream written to Redis far faster than it is read, in pieces small enough that
    # one read of events (500) is half a megabyte
    pieces = ["x" * 1000] * 20_000
    fake.script(model, Reply(pieces=pieces))
    assert gateway.proc is not None
    with httpx.Client(base_url=gateway.url, headers=AUTH, timeout=60) as http:
        before = _rss_mb(gateway.proc.pid)
        job = http.post("/v1/jobs", json={"url": "/v1/chat/completions", "body": {
            "model": model, "messages": USER, "stream": True}}).json()
        sock = _unread(gateway, f"GET /v1/jobs/{job['id']}/events HTTP/1.1\r\n"
                                f"Host: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
                                f"Connection: close\r\n\r\n".encode())
        # its status from Redis: a GET of the job would bring its whole response through
        wait_until(lambda: client.job(job["id"]).status() in TERMINAL, 60,
                   "the job to end while its reader reads nothing")
        assert client.job(job["id"]).status() is JobStatus.SUCCEEDED
        grown = _rss_mb(gateway.proc.pid) - before
        # the gateway holds what one read brought and a socket buffer, not the stream
        assert grown < 12, f"the gateway grew {grown:.1f} MB for a reader that read nothing"
        data = _rest(sock)
        # every chunk arrives after all: as many as the final event counts, the pieces among them
        final = json.loads(data.rsplit(b"data: ", 1)[1].split(b"\n", 1)[0])
        assert final["type"] == "done" and data.count(b'"type":"chunk"') == final["seq"]
        assert final["seq"] >= len(pieces)


def test_a_slow_reader_of_a_streamed_call_never_makes_the_gateway_buffer_it(
        gateway: GatewayProcess, fake: FakeUpstream, client: Any, model: str) -> None:
    """The same through ``POST /v1/chat/completions`` with ``stream``: the SDK's way in."""
    pieces = ["x" * 1000] * 20_000
    fake.script(model, Reply(pieces=pieces))
    assert gateway.proc is not None
    before = _rss_mb(gateway.proc.pid)
    body = json.dumps({"model": model, "messages": USER, "stream": True}).encode()
    sock = _unread(gateway, f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                            f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
                            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                            .encode() + body)
    fake.wait_for_requests(model, 1)
    [job_id] = jobs_of_model(client, model)
    wait_until(lambda: client.job(job_id).status() in TERMINAL, 60,
               "the job to end while its caller reads nothing")
    assert client.job(job_id).status() is JobStatus.SUCCEEDED
    grown = _rss_mb(gateway.proc.pid) - before
    assert grown < 12, f"the gateway grew {grown:.1f} MB for a caller that read nothing"
    data = _rest(sock)
    assert data.startswith(b"HTTP/1.1 200") and data.count(b"data: [DONE]\n\n") == 1
    assert data.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")  # the last chunk of the body
    assert data.count(b"x" * 1000) == len(pieces)  # every piece, once, in the end


@pytest.mark.parametrize(("url", "body"), [
    ("/v1/embeddings", {"input": ["a text"]}),
    ("/v1/responses", {"input": "Hello", "stream": True})])
def test_embeddings_and_responses_jobs(gateway: GatewayProcess, fake: FakeUpstream, model: str,
                                       url: str, body: dict[str, Any]) -> None:
    with httpx.Client(base_url=gateway.url, headers=AUTH, timeout=30) as http:
        created = http.post("/v1/jobs", json={"url": url, "body": {"model": model, **body}})
        assert created.status_code == 202, created.text
        job = created.json()
        assert job["url"] == url
        with http.stream("GET", f"/v1/jobs/{job['id']}/events") as events:
            seen = read_events(events)
        assert seen[-1]["type"] == "done"
        ended = http.get(f"/v1/jobs/{job['id']}").json()
    assert ended["status"] == "succeeded" and ended["url"] == url
    if url == "/v1/embeddings":
        assert ended["response"]["data"][0]["embedding"] and len(seen) == 1
    else:  # every typed event of the response's stream, then the job's own end
        assert seen[0]["data"]["type"] == "response.created"
        assert [e["data"]["sequence_number"] for e in seen[:-1]] == list(range(len(seen) - 1))
        assert seen[-2]["data"]["type"] == "response.completed"
        assert ended["response"] == seen[-2]["data"]["response"]


def _write(client: redis.Redis, keys: Keys, job_id: str, events: list[tuple[str, str]]) -> None:
    """Events of a job as a worker's relay writes them: stream entry, then publish."""
    for entry, event in events:
        client.xadd(keys.events(job_id), {EVENT_FIELD: event}, id=entry)
        client.publish(keys.channel(job_id), event)
    client.expire(keys.events(job_id), 600)


def test_a_stream_resumes_after_an_id_keeps_alive_and_passes_a_reset_on(
        worker_env: dict[str, str], workdir: Path, redis_client: redis.Redis) -> None:
    """On a prefix no worker serves, the job's events are written as two attempts of a
    worker would (the second after a crash: ``reset`` first), while a reader waits."""
    prefix = f"gw{uuid.uuid4().hex[:8]}"
    gateway = start_gateway({**worker_env, "API_TASKS_PREFIX": prefix}, workdir,
                            "unserved-gateway")
    keys = Keys(prefix, int(worker_env.get("API_TASKS_REDIS_SHARDS", "1")))
    chunk = '{"choices":[{"index":0,"delta":{"content":"%s"}}]}'
    try:
        with httpx.Client(base_url=gateway.url, headers=AUTH, timeout=30) as http:
            job = http.post("/v1/jobs", json={"url": "/v1/chat/completions", "body": {
                "model": "m", "messages": USER, "stream": True}}).json()
            _write(redis_client, keys, job["id"], [
                (entry_id(1, seq), chunk_event(seq, 1, chunk % f"a{seq}")) for seq in range(3)])
            url = f"/v1/jobs/{job['id']}/events"
            lines: list[str] = []
            with http.stream("GET", url) as answer:
                read = answer.iter_lines()
                while lines.count(": keep-alive") < 1:  # nothing new for keepalive (0.5 s)
                    lines.append(next(read))
                _write(redis_client, keys, job["id"], [
                    ("2-0", reset_event(2)), (entry_id(2, 0), chunk_event(0, 2, chunk % "b0")),
                    (entry_id(2, 1), final_event(JobStatus.SUCCEEDED, 1, 2,
                                                 finish_reason="stop"))])
                lines += list(read)  # to the final event, then the end
            ids = [line[4:] for line in lines if line.startswith("id: ")]
            assert ids == ["1-1", "1-2", "1-3", "2-0", "2-1", "2-2"]
            events = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
            assert [e["type"] for e in events] == ["chunk"] * 3 + ["reset", "chunk", "done"]
            assert events[3] == {"type": "reset", "seq": 0, "attempt": 2}
            # ?after= as Last-Event-ID: from the next entry on, the reset with it
            with http.stream("GET", url, params={"after": "1-2"}) as rest:
                assert [e["id"] for e in read_events(rest)] == ["1-3", "2-0", "2-1", "2-2"]
    finally:
        gateway.stop()


def _on_own_redis(stack: contextlib.ExitStack, worker_env: dict[str, str], workdir: Path,
                  name: str, own: RedisServer) -> tuple[RedisServer, dict[str, str],
                                                        GatewayProcess]:
    """A gateway of its own on a Redis of its own (started or not), both stopped with
    ``stack``."""
    stack.callback(own.stop)
    env = {k: v for k, v in worker_env.items() if k != "REDIS_STATE_URL"}
    env.update(REDIS_URL=own.url, API_TASKS_PREFIX=f"gw{uuid.uuid4().hex[:8]}")
    gateway = start_gateway(env, workdir, name)
    stack.callback(gateway.stop)
    return own, env, gateway


def test_a_gateway_started_while_its_redis_is_away_serves_503s_then_jobs(
        worker_env: dict[str, str], workdir: Path) -> None:
    """No Redis at its start: it starts all the same (a supervisor would otherwise restart
    it in a loop), answers 503 with Retry-After, and once Redis answers takes jobs whose
    stream tokens, signed with the secret the gateways share, open their streams."""
    job = {"url": "/v1/chat/completions", "body": {"model": "m", "messages": USER}}
    with contextlib.ExitStack() as stack:
        own, env, gateway = _on_own_redis(stack, worker_env, workdir, "late-redis-gateway",
                                          RedisServer(workdir / f"gw-late-{uuid.uuid4().hex[:6]}"))
        with httpx.Client(base_url=gateway.url, headers=AUTH, timeout=30) as http:
            down = http.post("/v1/jobs", json=job)
            assert down.status_code == 503 and int(down.headers["retry-after"]) >= 1
            assert down.json()["error"]["type"]
            assert "Traceback" not in gateway.log_path.read_text(errors="replace")
            assert http.get("/readyz").status_code == 503
            own.start()
            wait_until(lambda: http.post("/v1/jobs", json=job).status_code == 202, 15,
                       "the gateway to take jobs once Redis answers")
            made = http.post("/v1/jobs", json=job).json()
            url = f"/v1/jobs/{made['id']}/events"
            with httpx.stream("GET", gateway.url + url, params={"token": made["stream_token"]},
                              timeout=30) as opened:
                assert opened.status_code == 200  # (no worker: it waits for the first event)
            forged = http.get(url, params={"token": made["stream_token"][:-2] + "xx"},
                              headers={"Authorization": ""})
            assert forged.status_code == 404
            name = f"{env['API_TASKS_PREFIX']}:gateway:secret"
            shared = redis.Redis.from_url(own.url).get(name)
            assert shared and StreamTokens(shared, 3600).check(made["stream_token"], made["id"],
                                                              "main")
            # Redis lost the secret, and another gateway put a new one there: this one reads
            # it when a token signed with it fails its copy's check, and signs with it on
            redis.Redis.from_url(own.url).set(name, b"another-gateways-secret")
            theirs = StreamTokens(b"another-gateways-secret", 3600).issue(made["id"], "main")
            with httpx.stream("GET", gateway.url + url, params={"token": theirs},
                              timeout=30) as opened:
                assert opened.status_code == 200
            signed = http.post("/v1/jobs", json=job).json()
            assert StreamTokens(b"another-gateways-secret", 3600).check(
                signed["stream_token"], signed["id"], "main")
            # a loss with no other gateway about: this one puts back the secret it signs with
            # when it next reads it (here, as a bad token fails)
            redis.Redis.from_url(own.url).delete(name)
            assert http.get(url, params={"token": theirs[:-2] + "xx"},
                            headers={"Authorization": ""}).status_code == 404
            assert redis.Redis.from_url(own.url).get(name) == b"another-gateways-secret"


def test_redis_down_is_a_503_with_retry_after_and_the_gateway_serves_on(
        worker_env: dict[str, str], workdir: Path) -> None:
    job = {"url": "/v1/chat/completions", "body": {"model": "m", "messages": USER}}
    with contextlib.ExitStack() as stack:
        own, env, gateway = _on_own_redis(stack, worker_env, workdir, "redis-down-gateway", (
            RedisServer(workdir / f"gw-redis-{uuid.uuid4().hex[:6]}", persist=True).start()))
        with httpx.Client(base_url=gateway.url, headers=AUTH, timeout=30) as http:
            assert http.post("/v1/jobs", json=job).status_code == 202
            own.stop()
            for path, body in (("/v1/jobs", job), ("/v1/chat/completions", job["body"]),
                               ("/v1/chat/completions", {**job["body"], "stream": True})):
                down = http.post(path, json=body)
                assert down.status_code == 503, down.text
                assert int(down.headers["retry-after"]) >= 1
                assert set(down.json()["error"]) == {"message", "type", "param", "code"}
            assert http.get("/readyz").status_code == 503
            assert http.get("/healthz").status_code == 200  # the process itself answers
            assert "\napi_tasks_redis_up 0.0\n" in http.get("/metrics").text
            own.start()
            wait_until(lambda: http.post("/v1/jobs", json=job).status_code == 202, 15,
                       "the gateway to submit again once Redis is back")
        # the job before the outage and the one after: the refused submits left nothing
        queued = redis.Redis.from_url(own.url)
        lanes = queued.llen(f"{env['API_TASKS_PREFIX']}:celery:interactive")
        records = list(queued.scan_iter(f"{env['API_TASKS_PREFIX']}:job:*"))
        assert lanes == len(records) == 2
