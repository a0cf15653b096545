"""Who may call the gateway: the key-less loopback mode, a key from API_TASKS_GATEWAY_KEY or as
its hash (never stored or logged in clear), stream tokens (one job's, signed, expiring, taken by
every gateway), where it listens, and a gateway told to keep a gone client's job."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
import yaml

from api_tasks.client import Client
from api_tasks.gateway.auth import StreamTokens
from tests.conftest import GATEWAY_KEY as KEY
from tests.conftest import start_gateway
from tests.support.fake_upstream import FakeUpstream, Reply
from tests.support.job_events import read_events
from tests.support.records import jobs_of_model
from tests.support.services import ROOT, GatewayProcess, WorkerProcess, free_port, wait_until

pytestmark = pytest.mark.integration
USER = [{"role": "user", "content": "Hello"}]


def _keyless(config: dict[str, Any]) -> None:
    config["gateway"].pop("keys")


def _settings_file(worker_env: dict[str, str], workdir: Path,
                   change: Callable[[dict[str, Any]], None]) -> Path:
    config = yaml.safe_load(Path(worker_env["API_TASKS_CONFIG"]).read_text())
    change(config)
    path = workdir / f"gateway-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _values(client: redis.Redis, name: bytes) -> list[Any]:
    """Everything a key holds, whatever its type."""
    kind = client.type(name)
    if kind == b"string":
        return [client.get(name)]
    if kind == b"hash":
        return [v for pair in client.hgetall(name).items() for v in pair]
    if kind == b"list":
        return client.lrange(name, 0, -1)
    if kind == b"set":
        return list(client.smembers(name))
    if kind == b"zset":
        return client.zrange(name, 0, -1)
    if kind == b"stream":
        return [v for _, fields in client.xrange(name) for v in fields.values()]
    return []


def _stored_anywhere(client: redis.Redis, prefix: str, needle: bytes) -> list[str]:
    """The keys under ``prefix`` (all the project's) whose name or value holds ``needle``."""
    return [name.decode() for name in client.scan_iter(f"{prefix}:*")
            if needle in name or any(needle in (v or b"") for v in _values(client, name))]


def test_without_keys_it_serves_on_loopback_only_and_says_so(
        worker_env: dict[str, str], workdir: Path, worker: WorkerProcess, fake: FakeUpstream,
        model: str) -> None:
    env = {**worker_env, "API_TASKS_CONFIG": str(_settings_file(worker_env, workdir, _keyless))}
    for host in ("0.0.0.0", "::", "10.1.2.3", "gateway.example"):
        refused = subprocess.run(
            [sys.executable, "-m", "api_tasks", "gateway", "--host", host, "--port",
             str(free_port())], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert refused.returncode == 2, (host, refused.stderr)
        assert f"serves without auth on a loopback address only, not on {host}" in \
            refused.stderr and "Traceback" not in refused.stderr
    gateway = start_gateway(worker_env, workdir, "keyless-gateway", _keyless)
    try:
        assert "no API keys configured; serving without auth on 127.0.0.1 (loopback only)" \
            in gateway.log_path.read_text()
        fake.script(model, Reply(content="anyone on this machine"))
        sdk = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
        answer = sdk.chat.completions.create(model=model, messages=USER)
        assert answer.choices[0].message.content == "anyone on this machine"
        # a page whose DNS name rebinds to 127.0.0.1 names its own host: refused
        rebound = httpx.post(gateway.url + "/v1/jobs", headers={"Host": "evil.example:8000"},
                             json={"url": "/v1/chat/completions",
                                   "body": {"model": model, "messages": USER}})
        assert rebound.status_code == 403
        assert rebound.json()["error"]["code"] == "host_not_allowed"
    finally:
        gateway.stop()


def test_the_variable_alone_makes_a_key_named_default_never_kept_in_clear(
        worker_env: dict[str, str], workdir: Path, client: Client, redis_client: redis.Redis,
        fake: FakeUpstream, model: str) -> None:
    secret = f"sk-gw-default-{uuid.uuid4().hex}"
    gateway = start_gateway({**worker_env, "API_TASKS_GATEWAY_KEY": secret}, workdir,
                            "default-key-gateway", _keyless)
    try:
        fake.script(model, Reply(content="by default"))
        sdk = openai.OpenAI(base_url=gateway.url + "/v1", api_key=secret, max_retries=0)
        raw = sdk.chat.completions.with_raw_response.create(model=model, messages=USER)
        assert raw.parse().choices[0].message.content == "by default"
        job_id = raw.headers["x-request-id"]
        assert redis_client.hget(client.keys.job(job_id), "owner") == b"default"
        missing = httpx.post(gateway.url + "/v1/jobs", json={})
        assert missing.status_code == 401
        assert missing.json()["error"]["code"] == "missing_api_key"
        wrong = f"sk-gw-wrong-{uuid.uuid4().hex}"
        with pytest.raises(openai.AuthenticationError) as refused:
            openai.OpenAI(base_url=gateway.url + "/v1", api_key=wrong, max_retries=0
                          ).chat.completions.create(model=model, messages=USER)
        assert refused.value.code == "invalid_api_key"
        log = gateway.log_path.read_text()
    finally:
        gateway.stop()
    for presented in (secret, wrong):  # neither the key nor a wrong guess, in any key
        assert presented not in log
        assert _stored_anywhere(redis_client, client.keys.prefix, presented.encode()) == []


def test_a_key_given_as_its_hash(worker_env: dict[str, str], workdir: Path, client: Client,
                                 redis_client: redis.Redis, fake: FakeUpstream,
                                 model: str) -> None:
    secret = f"sk-gw-hashed-{uuid.uuid4().hex}"

    def hashed(config: dict[str, Any]) -> None:
        config["gateway"]["keys"] = [
            {"name": "hashed", "key_sha256": hashlib.sha256(secret.encode()).hexdigest()}]
    gateway = start_gateway(worker_env, workdir, "hashed-key-gateway", hashed)
    try:
        fake.script(model, Reply(content="by its hash"))
        sdk = openai.OpenAI(base_url=gateway.url + "/v1", api_key=secret, max_retries=0)
        raw = sdk.chat.completions.with_raw_response.create(model=model, messages=USER)
        assert raw.parse().choices[0].message.content == "by its hash"
        owner = redis_client.hget(client.keys.job(raw.headers["x-request-id"]), "owner")
        assert owner == b"hashed"
        with pytest.raises(openai.AuthenticationError):  # the hash itself is no key
            openai.OpenAI(base_url=gateway.url + "/v1", max_retries=0,
                          api_key=hashlib.sha256(secret.encode()).hexdigest()
                          ).chat.completions.create(model=model, messages=USER)
        assert secret not in gateway.log_path.read_text()
    finally:
        gateway.stop()


def test_a_stream_token_reads_one_job_until_it_expires_through_any_gateway(
        gateway: GatewayProcess, worker_env: dict[str, str], workdir: Path, client: Client,
        redis_client: redis.Redis, fake: FakeUpstream, model: str) -> None:
    fake.script(model, Reply(pieces=["one ", "job"]))
    fake.script(model + "-b", Reply(content="another"))
    with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=30) as http:
        first, second = (http.post("/v1/jobs", json={
            "url": "/v1/chat/completions",
            "body": {"model": name, "messages": USER, "stream": stream}}).json()
            for name, stream in ((model, True), (model + "-b", False)))
    other = start_gateway(worker_env, workdir, "second-gateway")  # same settings, apart
    try:
        events = f"/v1/jobs/{first['id']}/events"
        # issued by one gateway, taken by another: they share the signing secret
        with httpx.stream("GET", other.url + events, params={"token": first["stream_token"]},
                          timeout=30) as answer:
            assert answer.status_code == 200
            read = read_events(answer)
        assert read[-1]["type"] == "done"
        assert "".join(e["data"]["choices"][0]["delta"].get("content") or ""
                       for e in read if e["type"] == "chunk" and e["data"]["choices"]
                       ) == "one job"
        # for that job only
        assert httpx.get(other.url + f"/v1/jobs/{second['id']}/events",
                         params={"token": first["stream_token"]}).status_code == 404
        # and until it expires: one signed right, but an hour and a minute ago
        secret = redis_client.get(client.keys.gateway_secret())
        assert secret is not None
        tokens = StreamTokens(secret, 3600)
        stale = tokens.issue(first["id"], "main", now=time.time() - 3660)
        fresh = tokens.issue(first["id"], "main")
        assert httpx.get(other.url + events, params={"token": stale}).status_code == 404
        assert httpx.get(gateway.url + events, params={"token": stale}).status_code == 404
        with httpx.stream("GET", gateway.url + events, params={"token": fresh},
                          timeout=30) as answer:
            assert answer.status_code == 200 and read_events(answer) == read
        # signed for another key's job it is no use either
        theirs = tokens.issue(first["id"], "other")
        assert httpx.get(gateway.url + events, params={"token": theirs}).status_code == 404
    finally:
        other.stop()


def test_host_and_port_come_from_the_settings_or_the_environment(
        worker_env: dict[str, str], workdir: Path) -> None:
    port, host = free_port(), "127.0.0.2"  # a loopback address, but not the default one
    env = {**worker_env, "GW_MAIN_KEY": KEY, "GW_OTHER_KEY": "x", "GW_LIMITED_KEY": "y",
           "GW_HOOKED_KEY": "z", "GW_TOKENED_KEY": "t", "API_TASKS_GATEWAY_HOST": host,
           "API_TASKS_GATEWAY_PORT": str(port)}
    path = workdir / f"env-gateway-{uuid.uuid4().hex[:6]}.log"
    with open(path, "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "api_tasks", "gateway"], cwd=ROOT,
                                   env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        def answers() -> bool:
            assert process.poll() is None, path.read_text()
            try:
                return httpx.get(f"http://{host}:{port}/healthz").status_code == 200
            except httpx.TransportError:
                return False
        wait_until(answers, 30, "the gateway where API_TASKS_GATEWAY_HOST/_PORT say")
        assert f"api-tasks gateway on http://{host}:{port}" in path.read_text()
        with pytest.raises(httpx.TransportError):  # and only there
            httpx.get(f"http://127.0.0.1:{port}/healthz")
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def test_a_gateway_told_to_keep_jobs_lets_a_gone_clients_job_finish(
        worker_env: dict[str, str], workdir: Path, client: Client, fake: FakeUpstream,
        model: str) -> None:
    def keep(config: dict[str, Any]) -> None:
        config["gateway"]["cancel_on_disconnect"] = False
    gateway = start_gateway(worker_env, workdir, "keeping-gateway", keep)
    try:
        fake.script(model, Reply(delay=1.5, content="finished anyway"))
        impatient = openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0,
                                  timeout=0.3)
        with pytest.raises(openai.APITimeoutError):
            impatient.chat.completions.create(model=model, messages=USER)
        fake.wait_for_requests(model, 1)
    finally:
        gateway.stop()
    [job_id] = jobs_of_model(client, model)
    answer = client.job(job_id).result(timeout=15)
    assert answer is not None
    assert answer["choices"][0]["message"]["content"] == "finished anyway"
