"""What metrics and traces cost a worker: ``python -m bench.metrics [--jobs 1000] [--rounds 7]``.

One worker process (50 threads) runs the same chat jobs against the fake upstream
with its metrics on (the default: every job counted, ``/metrics`` served), on with traces
(``OTEL_TRACES_EXPORTER=otlp``, spans sent in OTLP batches to a local collector that takes
them) for 1 job in 10 (the SDK's ``parentbased_traceidratio`` sampler) and for every job,
and off (``API_TASKS_METRICS_PORT=off``: nothing counted, no traces), in rounds of one run
each; the figure is the worker's CPU per job, and each mode's ratio is the median over the
rounds of its run over the round's "off" run (paired: a slow spell of the machine weighs on
both; runs of one mode have been 1.45x apart). Then 200 jobs are held in flight (the fake
answers after 10 s) and ``/metrics`` is scraped 20 times: each scrape reads the
cluster's gauges from Redis too.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

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


def worker(stack: ExitStack, redis: RedisServer, upstream: FakeUpstream, workdir: Path,
           name: str, port: str, threads: int = THREADS, traced: float = 0.0
           ) -> tuple[Client, WorkerProcess]:
    """A worker with its metrics on (``port``) or off, with ``traced`` of its jobs traced
    (0: traces off), and a producer."""
    tracing = {"OTEL_TRACES_EXPORTER": "otlp",
               "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": _collector(),
               # the SDK's standard sampler: a trace is recorded or not from its start
               "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
               "OTEL_TRACES_SAMPLER_ARG": str(traced)}
    env = child_env(redis.url, OPENAI_BASE_URL=upstream.base_url + "/v1",
                    API_TASKS_PREFIX=f"{name}{time.monotonic_ns() % 100000}",
                    API_TASKS_METRICS_PORT=port, **(tracing if traced else {}))
    process = WorkerProcess(env, workdir / f"{name}.log", concurrency=threads,
                            name=name).start(wait=False)
    stack.callback(process.stop)
    client = Client(load_settings(env=env))
    wait_until(lambda: client.store.shell.run(alive(client.keys)), 120, "the worker's record")
    client.submit_chat(USER, model="warm").result(timeout=60)
    return client, process


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


def cpu_per_job(client: Client, process: WorkerProcess, n: int) -> float:
    """Worker CPU seconds per job over ``n`` jobs, all submitted at once."""
    before = cpu_seconds(process.pid)
    jobs = [client.submit_chat(USER, model="echo") for _ in range(n)]
    for job in jobs:
        job.result(timeout=300)
    return (cpu_seconds(process.pid) - before) / n


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
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="300 jobs a run")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    n = 300 if args.quick else args.jobs
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        redis, upstream = local_services(stack, workdir, record=False)
        started = time.monotonic()
        modes = {"off": 0.0, "on": 0.0, "traced": 1.0, "sampled": 0.1}  # share traced
        figures: dict[str, list[float]] = {mode: [] for mode in modes}
        for round_ in range(args.rounds):
            for mode, share in modes.items():
                with ExitStack() as inner:
                    client, process = worker(inner, redis, upstream, workdir,
                                             f"{mode}{round_}", "off" if mode == "off" else "0",
                                             traced=share)
                    figures[mode].append(cpu_per_job(client, process, n))
        ratio = {mode: median([run / base for run, base in zip(runs, figures["off"],
                                                               strict=True)])
                 for mode, runs in figures.items()}
        middle = {mode: median(runs) for mode, runs in figures.items()}
        off, on, sampled, traced = (middle[mode] for mode in ("off", "on", "sampled", "traced"))
        print("runs, worker CPU per job (us):", ", ".join(
            f"{mode} {' '.join(str(round(run * 1e6)) for run in runs)}"
            for mode, runs in figures.items()))
        spread = max(max(runs) / min(runs) for runs in figures.values())
        held = FakeUpstream().start()
        stack.callback(held.stop)
        with ExitStack() as inner:
            client, _ = worker(inner, redis, held, workdir, "scrape", "0", threads=250)
            times, seen = scrape_times(client, held, 200)
        rows: list[Row] = [
            ("worker CPU per job, metrics on / off (medians; ratio: median of rounds)",
             f"{on * 1e6:.0f} us", f"{off * 1e6:.0f} us",
             f"{ratio['on']:.3f}x (target <= 1.05x)"),
            ("worker CPU per job, metrics and traces on, 1 trace in 10 / off",
             f"{sampled * 1e6:.0f} us", f"{off * 1e6:.0f} us",
             f"{ratio['sampled']:.3f}x (target <= 1.05x)"),
            ("worker CPU per job, metrics and traces on, every trace / off",
             f"{traced * 1e6:.0f} us", f"{off * 1e6:.0f} us", f"{ratio['traced']:.3f}x"),
            ("the same, slowest run over fastest, any mode", f"{spread:.3f}x", "-",
             "noise"),
            (f"scrape of a worker with {seen} jobs in flight, median",
             f"{median(times) * 1000:.1f} ms", "-", "target < 50 ms"),
            ("the same, slowest of 20", f"{max(times) * 1000:.1f} ms",
             f"p90 {percentile(times, 90) * 1000:.1f} ms", "target < 50 ms"),
        ]
        title = (f"\nmetrics: {n} jobs a run, one worker of {THREADS} threads, metrics off, on, "
                 f"on with 1 trace in 10 and with every trace, {args.rounds} rounds "
                 f"(reference: off); "
                 f"{time.monotonic() - started:.0f} s")
        print(table(title, rows), flush=True)


if __name__ == "__main__":
    main()
