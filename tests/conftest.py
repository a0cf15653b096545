"""Session fixtures: one real Redis, one fake upstream, one real Celery worker.

Every test that submits jobs uses models named uniquely for it, so scripted
upstream behaviour and recorded requests never mix between tests. With
``API_TASKS_TEST_STATE_CLUSTER=1`` the project's state lives on a Redis Cluster of 3 primaries,
apart from the broker (``redis.state_url``), its jobs over 12 shards (``redis.shards``;
``scripts/test`` runs the core and fault tests so too); with ``API_TASKS_TEST_STATE_APART=1``
on a second plain Redis over 4 shards, where ``slot_audit`` checks what a cluster would refuse.
``redis_client`` reaches the state's Redis (a cluster client on a cluster), ``broker_client``
the broker's.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis
import yaml
from celery import Celery
from redis.cluster import RedisCluster

from api_tasks.broker import create_app
from api_tasks.client import Client
from api_tasks.record.writer import EventWriter
from config.loader import load_settings
from config.settings import Settings
from tests.support.fake_upstream import FakeUpstream
from tests.support.fault_proxy import FaultProxy
from tests.support.figures import Figures
from tests.support.services import (
    GatewayProcess,
    RedisClusterGroup,
    RedisServer,
    Spawn,
    WorkerProcess,
    free_port,
)
from tests.support.slot_audit import CROSS_SLOT_LEFT, SlotAudit, cross_slot
from tests.support.webhook_receiver import WebhookReceiver

SECRET = "sk-test-SECRET-9f8e7d6c5b4a"
GATEWAY_KEY = "sk-gw-test-7e1d9c"
GATEWAY_OTHER_KEY = "sk-gw-other-41aa"
GATEWAY_HOOKED_KEY = "sk-gw-hooked-90b2"
WEBHOOK_SECRET = "whsec_RdvaYFYUXuIFuEbvZHwMfYFhUf7aMYjYcmM24+Aj40c="  # openai-python's test one
GATEWAY_LIMITED_KEY = "sk-gw-limited-0c3f"
LIMITED_RPM = 120  # the limited key's own limit: a call every half second
GATEWAY_TOKENED_KEY = "sk-gw-tokened-5d21"
TOKENED_TPM = 60000  # the tokened key's own limit: 1,000 tokens a second
# the state on a Redis Cluster of 3 primaries (apart from the broker, which cannot be one)
STATE_CLUSTER = os.environ.get("API_TASKS_TEST_STATE_CLUSTER") == "1"
STATE_APART = STATE_CLUSTER or os.environ.get("API_TASKS_TEST_STATE_APART") == "1"
# the job shards the session's state is laid out in (for tests that name keys themselves)
STATE_SHARDS = 12 if STATE_CLUSTER else 4 if STATE_APART else 1


def upstream_settings(fake_url: str, proxy_url: str) -> list[dict[str, Any]]:
    """The upstreams the test worker knows: all on the fake server but one; catch-all last."""
    quick = {"initial_delay": 0.05, "max_delay": 0.2, "max_retry_after": 3}
    fake_port = fake_url.rsplit(":", 1)[1]
    return [
        {"name": "tight", "base_url": fake_url, "models": ["tight-*"],
         "timeouts": {"connect": 1, "read": 1, "total": 2.5},
         "retry": {"max_attempts": 1}, "max_response_bytes": 1048576,
         "max_line_bytes": 65536},
        {"name": "open", "base_url": f"http://127.0.0.1:{free_port()}", "models": ["open-*"],
         "job_base_url_hosts": [f"127.0.0.1:{fake_port}", "*.internal"],
         "retry": {"max_attempts": 1}},
        {"name": "named", "base_url": f"http://127.0.0.1:{free_port()}", "models": ["named-*"],
         "job_base_url_hosts": [f"localhost:{fake_port}"], "retry": {"max_attempts": 1}},
        {"name": "proxied", "base_url": proxy_url, "models": ["proxied-*"], "retry": quick,
         "timeouts": {"connect": 2, "read": 10, "total": 30}},
        {"name": "tight-retry", "base_url": fake_url, "models": [],
         "timeouts": {"connect": 1, "read": 1, "total": 2}, "retry": quick},
        {"name": "keyed", "base_url": fake_url, "models": ["keyed-*"],
         "api_key_env": "FAKE_UPSTREAM_KEY", "retry": quick},
        {"name": "closed", "base_url": f"http://127.0.0.1:{free_port()}", "models": ["closed-*"],
         "retry": {**quick, "max_attempts": 2}, "timeouts": {"connect": 1, "read": 2, "total": 3}},
        {"name": "fake", "base_url": fake_url + "/v1", "models": ["*"], "retry": quick,
         "timeouts": {"connect": 2, "read": 10, "total": 30},
         "defaults": {"temperature": 0.2},
         "model_defaults": {"layered-*": {"top_p": 0.5, "presence_penalty": None}}},
        # the only one serving the Responses API: responses jobs of any model come here
        {"name": "responder", "base_url": fake_url, "models": ["*"], "retry": quick,
         "endpoints": ["/v1/responses"], "timeouts": {"connect": 2, "read": 10, "total": 30}},
    ]


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("api_tasks")


@pytest.fixture(scope="session")
def redis_server(workdir: Path) -> Iterator[RedisServer]:
    server = RedisServer(workdir / "redis").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def state_server(workdir: Path, redis_server: RedisServer
                 ) -> Iterator[RedisServer | RedisClusterGroup]:
    """The Redis of the project's state: the broker's own, or one apart (or a cluster)."""
    if not STATE_APART:
        yield redis_server
        return
    server = RedisClusterGroup(workdir / "state-cluster") if STATE_CLUSTER \
        else RedisServer(workdir / "redis-state")
    server.start()
    yield server
    server.stop()


_CROSS_SLOT: dict[str, bytes] = {}


@pytest.fixture(scope="session", autouse=True)
def slot_audit(workdir: Path, state_server: RedisServer | RedisClusterGroup) -> Iterator[None]:
    """With the state apart, what a Redis Cluster would refuse of the state's commands: only
    what ``CROSS_SLOT_LEFT`` lists (the work left, which may only shrink). On a cluster the
    cluster itself refuses them."""
    if not isinstance(state_server, RedisServer) or not STATE_APART:
        yield
        return
    audit = SlotAudit("127.0.0.1", state_server.port, workdir / "state-monitor.log").start()
    yield
    audit.stop()
    _CROSS_SLOT.update(cross_slot(audit.path, redis.Redis.from_url(state_server.url)))
    unexpected = sorted(set(_CROSS_SLOT) - CROSS_SLOT_LEFT)
    assert not unexpected, f"cross-slot on a Redis Cluster: {unexpected}"


@pytest.fixture(scope="session")
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture(scope="session")
def proxy(fake: FakeUpstream) -> Iterator[FaultProxy]:
    server = FaultProxy(int(fake.base_url.rsplit(":", 1)[1])).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def webhook_receiver() -> Iterator[WebhookReceiver]:
    """Receives the webhooks of gateway key "hooked"."""
    with WebhookReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="session")
def webhook_trap() -> Iterator[WebhookReceiver]:
    """A receiver on a loopback address no setting allows: it must never hear anything."""
    with WebhookReceiver("127.0.0.2") as trap:
        yield trap


@pytest.fixture(scope="session")
def worker_env(workdir: Path, redis_server: RedisServer,
               state_server: RedisServer | RedisClusterGroup,
               fake: FakeUpstream,
               proxy: FaultProxy, webhook_receiver: WebhookReceiver,
               webhook_trap: WebhookReceiver) -> dict[str, str]:
    config = workdir / "settings.yaml"
    # the gateway's keys are the workers' too: a key's own limits apply in the worker
    config.write_text(yaml.safe_dump({
        "upstreams": upstream_settings(fake.base_url, proxy.base_url),
        "worker": {"shutdown_grace": 3},
        "gateway": {"keepalive": 0.5, "batch_window": 4, "keys": [
            {"name": "main", "key_env": "GW_MAIN_KEY"},
            {"name": "other", "key_env": "GW_OTHER_KEY", "models": ["allowed-*"],
             "queues": ["bulk"]},
            {"name": "limited", "key_env": "GW_LIMITED_KEY",
             "limits": {"requests_per_minute": LIMITED_RPM}},
            {"name": "tokened", "key_env": "GW_TOKENED_KEY",
             "limits": {"tokens_per_minute": TOKENED_TPM}},
            {"name": "hooked", "key_env": "GW_HOOKED_KEY", "webhooks": [
                {"url": webhook_receiver.url, "secret_env": "GW_HOOK_SECRET"},
                {"url": f"http://127.0.0.1:{free_port()}/hook", "secret_env": "GW_HOOK_SECRET",
                 "events": ["batch.completed"]},
                {"url": webhook_trap.url, "secret_env": "GW_HOOK_SECRET",
                 "events": ["batch.completed"]}]}]},
        "webhooks": {"private_hosts": ["127.0.0.1:*"], "initial_delay": 0.2, "max_delay": 1,
                     "timeout": 2, "retry_for": 60}}))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OPENAI_", "API_TASKS_", "REDIS_"))}
    env.update({"API_TASKS_CONFIG": str(config), "REDIS_URL": redis_server.url,
                "API_TASKS_PREFIX": f"t{uuid.uuid4().hex[:8]}", "FAKE_UPSTREAM_KEY": SECRET,
                "GW_HOOK_SECRET": WEBHOOK_SECRET,
                "API_TASKS_LOG_LEVEL": "DEBUG", "PYTHONUNBUFFERED": "1",
                "API_TASKS_METRICS_PORT": "0"})  # many workers on one machine: any free port
    if isinstance(state_server, RedisClusterGroup):
        env["REDIS_STATE_URL"] = state_server.cluster_url
        env["API_TASKS_REDIS_SHARDS"] = str(STATE_SHARDS)  # a few per primary
    elif state_server is not redis_server:
        env["REDIS_STATE_URL"] = state_server.url
        env["API_TASKS_REDIS_SHARDS"] = str(STATE_SHARDS)  # so the audit sees them apart
    return env


@pytest.fixture(scope="session")
def settings(worker_env: dict[str, str]) -> Settings:
    producer_env = {k: v for k, v in worker_env.items() if k != "FAKE_UPSTREAM_KEY"}
    return load_settings(env=producer_env)


@pytest.fixture(scope="session")
def worker(worker_env: dict[str, str], workdir: Path) -> Iterator[WorkerProcess]:
    process = WorkerProcess(worker_env, workdir / "worker.log").start()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def client(settings: Settings, worker: WorkerProcess) -> Client:
    return Client(settings)


@pytest.fixture
def celery_app(client: Client) -> Iterator[Celery]:
    """A plain Celery producer on the client's settings, for messages no ``Client`` sends."""
    app = create_app(client.settings)
    yield app
    app.close()


@pytest.fixture(scope="session")
def redis_client(state_server: RedisServer | RedisClusterGroup) -> redis.Redis:
    """The Redis of the project's state (records, results, streams...): on a cluster, a
    cluster client (which offers ``redis.Redis``'s commands)."""
    if isinstance(state_server, RedisClusterGroup):
        return cast("redis.Redis", RedisCluster.from_url(state_server.url))
    return redis.Redis.from_url(state_server.url)


@pytest.fixture(scope="session")
def broker_client(redis_server: RedisServer, redis_client: redis.Redis) -> redis.Redis:
    """The broker's Redis (queues, unacked messages): ``redis_client`` unless apart."""
    return redis.Redis.from_url(redis_server.url) if STATE_APART else redis_client


@pytest.fixture
def writer(redis_client: redis.Redis) -> Iterator[EventWriter]:
    """An event writer of this process on the session's Redis."""
    events = EventWriter(redis_client)
    events.start()
    yield events
    events.close()


@pytest.fixture
def spawn(workdir: Path) -> Iterator[Spawn]:
    """Start worker processes for one test (``spawn(env, name, concurrency=8)``); all are
    stopped after it."""
    spawner = Spawn(workdir)
    yield spawner
    spawner.stop_all()


@pytest.fixture
def model() -> str:
    """A model name unique to the test, so its scripted steps are its own."""
    return f"m-{uuid.uuid4().hex[:10]}"


_FIGURES = Figures()


@pytest.fixture(scope="session")
def figures() -> Figures:
    """Where fault tests record what they measured (printed at the end of the run)."""
    return _FIGURES


def pytest_sessionfinish(session: pytest.Session) -> None:
    """In a test process of ``pytest -n``: hand what it measured to the controlling one."""
    output = getattr(session.config, "workeroutput", None)
    if output is not None:
        output["figures"] = _FIGURES.rows
        output["cross_slot"] = {name: keys.decode("latin-1") for name, keys in _CROSS_SLOT.items()}


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """In the controlling process of ``pytest -n``: gather what a test process measured."""
    output = getattr(node, "workeroutput", {})
    _FIGURES.rows.extend(tuple(row) for row in output.get("figures", ()))
    _CROSS_SLOT.update({name: keys.encode("latin-1")
                        for name, keys in output.get("cross_slot", {}).items()})


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _FIGURES.rows:
        terminalreporter.write_sep("-", "reliability figures (see RELIABILITY.md)")
        terminalreporter.write_line(_FIGURES.table())
    if _CROSS_SLOT:
        terminalreporter.write_sep("-", "what a Redis Cluster would refuse (issue 15)")
        for name, keys in sorted(_CROSS_SLOT.items()):
            terminalreporter.write_line(f"{name}: {keys.decode(errors='replace')}")


def start_gateway(worker_env: dict[str, str], workdir: Path, name: str,
                  change: Callable[[dict[str, Any]], None] | None = None) -> GatewayProcess:
    """A gateway on the tests' settings and keys (with ``change`` made to a copy of the
    settings), started; the caller stops it."""
    env = {k: v for k, v in worker_env.items() if k != "FAKE_UPSTREAM_KEY"}
    env.update({"GW_MAIN_KEY": GATEWAY_KEY, "GW_OTHER_KEY": GATEWAY_OTHER_KEY,
                "GW_LIMITED_KEY": GATEWAY_LIMITED_KEY, "GW_HOOKED_KEY": GATEWAY_HOOKED_KEY,
                "GW_TOKENED_KEY": GATEWAY_TOKENED_KEY})
    if change is not None:
        config = yaml.safe_load(Path(worker_env["API_TASKS_CONFIG"]).read_text())
        change(config)
        path = workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        env["API_TASKS_CONFIG"] = str(path)
    return GatewayProcess(env, workdir / f"{name}.log").start()


@pytest.fixture(scope="session")
def gateway(worker_env: dict[str, str], workdir: Path,
            worker: WorkerProcess) -> Iterator[GatewayProcess]:
    process = start_gateway(worker_env, workdir, "gateway")
    yield process
    process.stop()
