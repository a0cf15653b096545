"""One model served by three deployments, one killed and one slowed mid-run:
``python -m bench.deployments``.

Chat jobs are submitted at a steady rate to a model group of three deployments of the fake
upstream (each answers after 50 ms), run by 2 worker processes at the default settings
(breaker: 5 failed calls within 30 s open it for 30 s). In the faulty run, a third of the
way in one deployment is killed (its server stops: calls are refused), and halfway another
turns slow (2 s before it answers anything). The reference is the same run with the three
healthy. Latency is a job's submit to its end, from its record; where calls went is what
the servers themselves received.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import yaml

from api_tasks import JobFailed
from api_tasks.record.reader import Job
from bench.harness import child_env, log_warnings, percentile, start_workers
from bench.run import table
from bench.scenarios import Row
from tests.support.fake_upstream import FakeUpstream, Reply
from tests.support.services import RedisServer

__all__ = ["main"]

MODEL = "group-model"
USER = [{"role": "user", "content": "Say something short."}]
SLOW = 2.0  # seconds the slowed deployment takes before it answers
BREAKER_FAILURES = 5  # the default breaker.failures


@dataclass
class Outcome:
    """One run's figures."""

    failed: int
    latencies: list[float]  # seconds, submit to end, per job
    refused: int  # calls the killed deployment refused: sent after it died (probes too)
    cut: int  # its calls under way when it died, cut
    slow_share: tuple[float, float]  # the slowed one's share of calls within 10 s of the
    # slowdown, and after those (the reference: over the same windows of its run)
    elapsed: float


def run(redis_url: str, workdir: Path, n: int, rate: float, faults: bool) -> Outcome:
    """``n`` jobs at ``rate`` a second; with ``faults``, one deployment dies, one slows."""
    name = "faults" if faults else "healthy"
    with ExitStack() as stack:
        servers = [stack.enter_context(FakeUpstream()) for _ in range(3)]
        for server in servers:
            server.script(MODEL, Reply(content="short answer", delay=0.05))
        config = workdir / f"{name}.yaml"
        config.write_text(yaml.safe_dump({"upstreams": [{
            "name": "group", "models": [MODEL], "deployments": [
                {"name": f"d{i}", "base_url": server.base_url}
                for i, server in enumerate(servers)]}]}))
        env = child_env(redis_url, API_TASKS_CONFIG=str(config),
                        API_TASKS_PREFIX=f"{name}{uuid.uuid4().hex[:4]}")
        (workdir / name).mkdir(exist_ok=True)
        client = start_workers(stack, env, workdir / name, 2, threads=50)
        client.submit_chat(USER, model=MODEL).result(timeout=60)  # warm up
        period = 1.0 / rate
        marks: dict[str, float] = {}

        def fault(at: float, what: str) -> None:
            time.sleep(at)
            if what == "kill":
                servers[0].stop()
            else:
                servers[1].first_byte_delay = SLOW
            marks[what] = time.monotonic()

        length = n * period
        if faults:
            for at, what in ((length / 3, "kill"), (length / 2, "slow")):
                threading.Thread(target=fault, args=(at, what), daemon=True).start()
        started = time.monotonic()
        jobs: list[Job] = []
        for i in range(n):  # open loop: arrivals do not wait for answers
            delay = started + i * period - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            jobs.append(client.submit_chat(USER, model=MODEL))
        return _outcome(jobs, servers, marks, started, time.monotonic() - started)


def _outcome(jobs: list[Job], servers: list[FakeUpstream], marks: dict[str, float],
             started: float, elapsed: float) -> Outcome:
    failed, latencies, refused, cut = 0, [], 0, 0
    for job in jobs:
        with contextlib.suppress(JobFailed):
            job.result(timeout=300)
        view = job.describe()
        failed += view["status"] != "succeeded"
        latencies.append(view["finished_at"] - view["created_at"])
        errors = [t["error"]["code"] for t in view["tries"]
                  if t["deployment"] == "d0" and t["error"]]
        refused += errors.count("connection_refused")
        cut += len(errors) - errors.count("connection_refused")
    slowed = marks.get("slow", started + elapsed / 2)
    shares = []
    for low, high in ((slowed, slowed + 10), (slowed + 10, float("inf"))):
        counts = [sum(1 for r in server.requests(MODEL) if low <= r.at < high)
                  for server in servers]
        shares.append(counts[1] / max(sum(counts), 1))
    return Outcome(failed, latencies, refused, cut, (shares[0], shares[1]), elapsed)


def rows(faulty: Outcome, healthy: Outcome) -> list[Row]:
    p99, ref99 = percentile(faulty.latencies, 99), percentile(healthy.latencies, 99)
    p50, ref50 = percentile(faulty.latencies, 50), percentile(healthy.latencies, 50)
    return [
        ("jobs failed", str(faulty.failed), str(healthy.failed), "target 0"),
        ("job latency p50", f"{p50 * 1000:.0f} ms", f"{ref50 * 1000:.0f} ms",
         f"{p50 / ref50:.2f}x"),
        ("job latency p99", f"{p99 * 1000:.0f} ms", f"{ref99 * 1000:.0f} ms",
         f"{p99 / ref99:.2f}x (target <= 1.5x)"),
        ("calls to the killed deployment cut as it died", str(faulty.cut), str(healthy.cut),
         "moved at once"),
        ("calls sent to it after it died (refused), probes included", str(faulty.refused),
         str(healthy.refused), f"target <= {BREAKER_FAILURES} + 1 probe per 30 s"),
        ("slowed deployment's share of calls, its first 10 s slow",
         f"{faulty.slow_share[0]:.1%}", f"{healthy.slow_share[0]:.1%}", "cut within 10 s"),
        ("slowed deployment's share of calls, after those", f"{faulty.slow_share[1]:.1%}",
         f"{healthy.slow_share[1]:.1%}", "cut"),
        ("submit first to last", f"{faulty.elapsed:.1f} s", f"{healthy.elapsed:.1f} s",
         f"{faulty.elapsed / healthy.elapsed:.2f}x"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=100.0, help="jobs submitted a second")
    parser.add_argument("--quick", action="store_true", help="1,500 jobs, for a smoke run")
    parser.add_argument("--keep", type=Path, help="keep the worker logs in this directory")
    args = parser.parse_args()
    n = 1500 if args.quick else args.jobs
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.keep or Path(tmp)
        redis = RedisServer(workdir / "redis").start()
        try:
            started = time.monotonic()
            healthy = run(redis.url, workdir, n, args.rate, faults=False)
            faulty = run(redis.url, workdir, n, args.rate, faults=True)
        finally:
            redis.stop()
        title = (f"\ndeployments: {n} jobs at {args.rate:g}/s to one model on three "
                 f"deployments, 2 workers; one killed at 1/3, one {SLOW:g} s slow from 1/2 "
                 f"(reference: the same run, all healthy); {time.monotonic() - started:.0f} s")
        print(table(title, rows(faulty, healthy)), flush=True)
        for name in ("faults", "healthy"):
            print(f"{name}: " + log_warnings(workdir / name), flush=True)


if __name__ == "__main__":
    main()
