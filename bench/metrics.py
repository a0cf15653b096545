"""What metrics and traces cost a worker: ``python -m bench.metrics [--jobs 500] [--rounds 5]
[--launches 5] [--split]``.

Pairs of worker processes (50 threads each) run the same chat jobs against the fake upstream.
In each pair one worker has its metrics off (``API_TASKS_METRICS_PORT=off``: nothing counted,
no traces) and the other has them on (the default: every job counted, ``/metrics`` served), on
with traces (``OTEL_TRACES_EXPORTER=otlp``, spans sent in OTLP batches, the SDK's defaults, to
a local collector that takes them) for 1 job in 10, or on with every job traced: this process
traces its submits, sampling each at its worker's share, and the workers follow (the SDK's
``parentbased_traceidratio`` sampler). A round gives each pair in turn a burst of jobs, half to
each of its workers at once, so that a slow spell of this shared machine falls on both (runs in
sequence have been 1.45x apart here). The workers run on one core, this process and Redis on
the other (see ``pin``). A worker's figure is its CPU over the rounds and a wait for its last
spans' export, less what its pair's "off" worker spent while the pair sat idle, per job. Two
workers of the same settings differ by up to 3% a launch, so every launch starts fresh pairs,
and a mode's figures add up over the launches. Then 200 jobs are held in flight (the fake
answers after 10 s) and ``/metrics`` is scraped 20 times: each scrape reads the cluster's
gauges from Redis too.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import threading
import time
from contextlib import ExitStack
from contextvars import ContextVar
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple

import httpx

from api_tasks.client import Client
from api_tasks.record.workers import alive, records
from bench.harness import child_env, cpu_seconds, local_services, median, percentile
from bench.run import table
from bench.scenarios import USER, Row
from config.loader import load_settings
from tests.support.fake_upstream import FakeUpstream, Reply
from tests.support.services import RedisServer, WorkerProcess, wait_until

__all__ = ["main"]

THREADS = 50


class Worker(NamedTuple):
    """A worker process, its producer, and the share of its jobs whose submits are sampled."""

    client: Client
    process: WorkerProcess
    traced: float


def workers(stack: ExitStack, redis: RedisServer, upstream: FakeUpstream, workdir: Path,
            specs: list[tuple[str, str, float]], threads: int = THREADS) -> list[Worker]:
    """Workers (name, metrics port or "off", share of jobs traced: 0 for traces off), each
    with a producer, started together and each warmed by a job."""
    started = []
    for name, port, traced in specs:
        kept = _UNEXPORTED if name.startswith("unexported") else {}
        tracing = {"OTEL_TRACES_EXPORTER": "otlp",
                   "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": _collector(),
                   # the SDK's standard sampler: a trace is recorded or not from its start
                   "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                   "OTEL_TRACES_SAMPLER_ARG": str(traced)}
        env = child_env(redis.url, OPENAI_BASE_URL=upstream.base_url + "/v1",
                        API_TASKS_PREFIX=f"{name}{time.monotonic_ns() % 100000}",
                        API_TASKS_METRICS_PORT=port, **(tracing | kept if traced else {}))
        process = WorkerProcess(env, workdir / f"{name}.log", concurrency=threads,
                                name=name).start(wait=False)
        stack.callback(process.stop)
        started.append(Worker(Client(load_settings(env=env)), process, traced))
    for client, process, _ in started:
        wait_until(lambda: client.store.shell.run(alive(client.keys)), 120,  # noqa: B023
                   "the worker's record")
        pin(process.pid, WORKER_CORE)
        client.submit_chat(USER, model="warm").result(timeout=60)
    return started


# two cores: the workers on one, this process (producer, fake upstream, collector) and Redis
# on the other. Both workers of a pair then meet the same contention, and launches that
# ranged over 15% unpinned range over 2% (one core: no pinning)
CORES = sorted(os.sched_getaffinity(0))
WORKER_CORE, OWN_CORE = (CORES[0], CORES[1]) if len(CORES) >= 2 else (None, None)


def pin(pid: int, core: int | None) -> None:
    """Keep every thread of process ``pid`` on ``core`` (threads it starts later inherit)."""
    if core is None:
        return
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that just ended
            os.sched_setaffinity(int(task.name), {core})


_SHARE: ContextVar[float] = ContextVar("share", default=0.0)


def trace_submits() -> None:
    """Trace this process's submits, as the application of the issue's flow does: a submit's
    sampler decides (at the share of the worker it goes to), its worker follows the
    ``traceparent``. The producer's own spans go nowhere."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import Sampler, SamplingResult, TraceIdRatioBased

    class Share(Sampler):
        def should_sample(self, *args: Any, **kwargs: Any) -> SamplingResult:
            return TraceIdRatioBased(_SHARE.get()).should_sample(*args, **kwargs)

        def get_description(self) -> str:
            return "the share of the worker a submit goes to"

    trace.set_tracer_provider(TracerProvider(sampler=Share()))


def submit(worker: Worker) -> Any:
    """One chat job to ``worker``, its trace sampled at its share."""
    token = _SHARE.set(worker.traced)
    try:
        return worker.client.submit_chat(USER, model="echo")
    finally:
        _SHARE.reset(token)


class _Collector(BaseHTTPRequestHandler):
    """Takes OTLP/HTTP exports and answers 200, as a collector does."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


_collectors: list[ThreadingHTTPServer] = []


def _collector() -> str:
    """The URL of this bench's OTLP sink (started once)."""
    if not _collectors:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        _collectors.append(server)
    return f"http://127.0.0.1:{_collectors[0].server_address[1]}/v1/traces"


PAIRS = {"on": 0.0, "sampled": 0.1, "traced": 1.0}  # each beside a worker with metrics off
# --split: where 1 trace in 10 costs (nothing recorded; recorded, never exported; exported)
SPLIT = {"unsampled": 1e-9, "unexported": 0.1, "sampled": 0.1}
_UNEXPORTED = {"OTEL_BSP_SCHEDULE_DELAY": "3600000", "OTEL_BSP_MAX_QUEUE_SIZE": "10000000",
               "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "10000000"}  # spans kept until the end
EXPORT_DELAY = 5.0  # s: the SDK's batch span processor exports at least this often


def burst(workers: list[Worker], n: int) -> list[float]:
    """Each worker's CPU seconds per job over ``n`` jobs each, all submitted at once and in
    turn (a slow spell of the machine falls on both)."""
    before = [cpu_seconds(worker.process.pid) for worker in workers]
    jobs = [submit(worker) for _ in range(n) for worker in workers]
    for job in jobs:
        job.result(timeout=300)
    return [(cpu_seconds(worker.process.pid) - start) / n
            for worker, start in zip(workers, before, strict=True)]


def launch(redis: RedisServer, upstream: FakeUpstream, workdir: Path, k: int, n: int,
           rounds: int, modes: dict[str, float]) -> dict[str, tuple[float, float, list[float]]]:
    """Fresh pairs of workers through ``rounds`` rounds: by mode, its worker's CPU per job,
    its off worker's, and each round's ratio."""
    with ExitStack() as stack:
        started = workers(stack, redis, upstream, workdir, [
            spec for mode, share in modes.items()
            for spec in ((f"off-{mode}{k}", "off", 0.0), (f"{mode}{k}", "0", share))])
        pairs = {mode: (started[2 * i], started[2 * i + 1]) for i, mode in enumerate(modes)}
        for both in pairs.values():  # every code path loaded, the thread pools full
            burst(list(both), n)
        time.sleep(EXPORT_DELAY + 1)  # and the warm-up's spans exported
        start = {mode: [cpu_seconds(worker.process.pid) for worker in both]
                 for mode, both in pairs.items()}
        inside = dict.fromkeys(pairs, 0.0)  # the off worker's CPU in its pair's rounds
        runs: dict[str, list[float]] = {mode: [] for mode in pairs}
        for _ in range(rounds):
            for mode, both in pairs.items():
                off_run, run = burst(list(both), n)
                inside[mode] += off_run * n
                runs[mode].append(run / off_run)
        time.sleep(EXPORT_DELAY + 1)  # the last spans exported, in the figure too
        figures = {}
        for mode, ((_, off_process, _), (_, process, _)) in pairs.items():
            off_begin, begin = start[mode]
            idle = cpu_seconds(off_process.pid) - off_begin - inside[mode]
            figures[mode] = ((cpu_seconds(process.pid) - begin - idle) / (n * rounds),
                             inside[mode] / (n * rounds), runs[mode])
        return figures


def _pair(figures: tuple[float, float]) -> tuple[str, str]:
    return f"{figures[0] * 1e6:.0f} us", f"{figures[1] * 1e6:.0f} us"


def scrape_times(client: Client, upstream: FakeUpstream, in_flight: int) -> tuple[list[float],
                                                                                   int]:
    """Scrape durations (s) with ``in_flight`` jobs held upstream, and the calls seen."""
    upstream.script("held", Reply(delay=10.0))
    jobs = [client.submit_chat(USER, model="held") for _ in range(in_flight)]
    upstream.wait_for_requests("held", in_flight, timeout=60)
    [record] = client.store.shell.run(records(client.keys, client.store.shell.run(
        alive(client.keys))))
    url = f"http://127.0.0.1:{record['metrics_port']}/metrics"
    times = []
    with httpx.Client() as http:
        for _ in range(20):
            started = time.perf_counter()
            assert http.get(url, timeout=10).status_code == 200
            times.append(time.perf_counter() - started)
    for job in jobs:
        job.result(timeout=60)
    return times, len(upstream.requests("held"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--quick", action="store_true",
                        help="200 jobs a burst, 2 launches of 3 rounds")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--launches", type=int, default=5)
    parser.add_argument("--split", action="store_true",
                        help="where 1 trace in 10 costs: nothing recorded, recorded but never "
                             "exported, exported (no scrape)")
    args = parser.parse_args()
    modes = SPLIT if args.split else PAIRS
    n = 200 if args.quick else args.jobs
    rounds = 3 if args.quick else args.rounds
    launches = 2 if args.quick else args.launches
    trace_submits()
    pin(os.getpid(), OWN_CORE)  # before Redis and the fake upstream start: they inherit it
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        redis, upstream = local_services(stack, workdir, record=False)
        started = time.monotonic()
        per_job: dict[str, tuple[float, float]] = dict.fromkeys(modes, (0.0, 0.0))
        rounds_ratio: dict[str, list[float]] = {mode: [] for mode in modes}
        launch_ratio: dict[str, list[float]] = {mode: [] for mode in modes}
        for k in range(launches):
            for mode, (ours, off, runs) in launch(redis, upstream, workdir, k, n,
                                                  rounds, modes).items():
                per_job[mode] = (per_job[mode][0] + ours / launches,
                                 per_job[mode][1] + off / launches)
                rounds_ratio[mode] += runs
                launch_ratio[mode].append(ours / off)
        ratio = {mode: ours / off for mode, (ours, off) in per_job.items()}
        print("launches, worker CPU over its off worker's:", ", ".join(
            f"{mode} {' '.join(f'{r:.3f}' for r in runs)}" for mode, runs in
            launch_ratio.items()))
        print("rounds, the same:", ", ".join(
            f"{mode} {' '.join(f'{r:.2f}' for r in runs)}" for mode, runs in
            rounds_ratio.items()), "(a traced worker's spans leave every 5 s: in some rounds)")
        if args.split:
            print(table(f"\nmetrics: where 1 trace in 10 costs, {launches} launches of {rounds} "
                        f"rounds of {n} jobs (reference: metrics and traces off)", [
                (f"worker CPU per job, {what} / off", *_pair(per_job[mode]),
                 f"{ratio[mode]:.3f}x, {(per_job[mode][0] - per_job[mode][1]) * 1e6:.0f} us")
                for mode, what in (("unsampled", "traces on, nothing sampled"),
                                   ("unexported", "1 in 10 recorded, never exported"),
                                   ("sampled", "1 in 10 recorded and exported"))]), flush=True)
            return
        spread = (min(launch_ratio["on"]), max(launch_ratio["on"]))
        held = FakeUpstream().start()
        stack.callback(held.stop)
        with ExitStack() as inner:
            [(client, _, _)] = workers(inner, redis, held, workdir, [("scrape", "0", 0.0)],
                                       threads=250)
            times, seen = scrape_times(client, held, 200)
        rows: list[Row] = [
            ("worker CPU per job, metrics on / off", *_pair(per_job["on"]),
             f"{ratio['on']:.3f}x (target <= 1.05x)"),
            ("worker CPU per job, metrics and traces on, 1 trace in 10 / off",
             *_pair(per_job["sampled"]), f"{ratio['sampled']:.3f}x (target <= 1.05x)"),
            ("worker CPU per job, metrics and traces on, every trace / off",
             *_pair(per_job["traced"]), f"{ratio['traced']:.3f}x"),
            ("metrics on / off, one launch's ratio, least and most", f"{spread[0]:.3f}x",
             f"{spread[1]:.3f}x", "noise"),
            (f"scrape of a worker with {seen} jobs in flight, median",
             f"{median(times) * 1000:.1f} ms", "-", "target < 50 ms"),
            ("the same, slowest of 20", f"{max(times) * 1000:.1f} ms",
             f"p90 {percentile(times, 90) * 1000:.1f} ms", "target < 50 ms"),
        ]
        title = (f"\nmetrics: pairs of workers of {THREADS} threads, metrics off beside on, on "
                 f"with 1 trace in 10 and with every trace; {launches} launches of {rounds} "
                 f"rounds of {n} jobs each (reference: off); "
                 f"{time.monotonic() - started:.0f} s")
        print(table(title, rows), flush=True)


if __name__ == "__main__":
    main()
