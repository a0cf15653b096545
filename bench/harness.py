"""Benchmark plumbing: services in their own processes, and what a process costs."""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from api_tasks.client import Client
from api_tasks.record.workers import alive
from config.loader import load_settings
from tests.support.fake_upstream import FakeUpstream
from tests.support.services import ROOT, RedisServer, WorkerProcess, free_port, wait_until

__all__ = ["Services", "child_env", "cpu_seconds", "local_services", "log_warnings", "median",
           "memory_mb", "percentile", "services", "start_workers"]

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def memory_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident memory (``VmRSS``) or its peak (``VmHWM``) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) of the values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def median(values: list[float]) -> float:
    return statistics.median(values)


@dataclass
class Services:
    """A Redis and the fake upstream, each in its own process."""

    redis: RedisServer
    upstream_url: str
    workdir: Path

    def env(self, prefix: str | None = None, **extra: str) -> dict[str, str]:
        """Environment for a worker or producer of this run."""
        return child_env(self.redis.url, OPENAI_BASE_URL=self.upstream_url,
                         API_TASKS_PREFIX=prefix or f"b{uuid.uuid4().hex[:6]}", **extra)

    @contextmanager
    def worker(self, env: dict[str, str], *, app: str = "worker", pool: str = "threads",
               concurrency: int = 200, name: str = "bench") -> Iterator[WorkerProcess]:
        """A worker process for the duration of the block."""
        process = WorkerProcess(env, self.workdir / f"{name}.log", concurrency=concurrency,
                                app=app, pool=pool, name=name,
                                extra=("-l", "WARNING") if app != "worker" else ())
        if app != "worker":
            process.queues = "celery"
        process.start(wait=False)  # callers warm it up with a first job
        try:
            yield process
        finally:
            process.stop()


def child_env(redis_url: str, **extra: str) -> dict[str, str]:
    """This process's environment without the project's settings, then this run's."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OPENAI_", "API_TASKS_", "REDIS_"))}
    env.update({"REDIS_URL": redis_url, "API_TASKS_LOG_LEVEL": "WARNING",
                "PYTHONPATH": str(ROOT)})
    return {**env, **extra}


def local_services(stack: ExitStack, workdir: Path,
                   record: bool = True) -> tuple[RedisServer, FakeUpstream]:
    """A Redis of its own and the fake upstream in this process, until ``stack`` closes."""
    redis = RedisServer(workdir / "redis").start()
    stack.callback(redis.stop)
    return redis, stack.enter_context(FakeUpstream(record=record))


def start_workers(stack: ExitStack, env: dict[str, str], workdir: Path, count: int,
                  threads: int) -> Client:
    """``count`` worker processes until ``stack`` closes; a producer once all are alive."""
    for i in range(count):
        process = WorkerProcess(env, workdir / f"w{i}.log", concurrency=threads,
                                name=f"w{i}").start(wait=False)  # logs at WARNING: no "ready"
        stack.callback(process.stop)
    client = Client(load_settings(env=env))
    # each worker's liveness record, as the health probe reads them (no broadcast ping)
    wait_until(lambda: len(client.store.shell.run(alive(client.keys))) >= count, 120,
               "the workers' liveness records")
    return client


@contextmanager
def services(workdir: Path) -> Iterator[Services]:
    """Start Redis and the fake upstream; stop them afterwards."""
    # as docker-compose.yml: a thousand job threads and two thousand readers connect at once
    redis = RedisServer(workdir / "redis", args=("--tcp-backlog", "4096")).start()
    port = free_port()
    upstream = subprocess.Popen([sys.executable, "-m", "bench.upstream", str(port)], cwd=ROOT,
                                stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert upstream.stdout is not None
        assert upstream.stdout.readline().strip() == b"ready"
        yield Services(redis, f"http://127.0.0.1:{port}/v1", workdir)
    finally:
        upstream.terminate()
        upstream.wait(10)
        redis.stop()


def log_warnings(workdir: Path, top: int = 5) -> str:
    """The workers' warnings and errors, counted by message shape (digits masked)."""
    shapes: Counter[str] = Counter()
    for path in sorted(workdir.glob("w*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("[") and ("WARNING/" in line or "ERROR/" in line):
                shapes[re.sub(r"[0-9a-f]{8,}|\d+(\.\d+)?", "N", line.split("] ", 1)[-1])] += 1
    lines = [f"worker log: {sum(shapes.values())} warnings and errors"]
    lines += [f"  {count:6d} x {shape}" for shape, count in shapes.most_common(top)]
    return "\n".join(lines)
